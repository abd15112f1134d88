"""The user's path without surprises (issue 16), data side: a `clip-data folder` output is read
once per image, found from its root folder, help shows defaults, progress counts whole samples,
written weights are readable by colleagues."""
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from data_tools.cli import build_parser, main
from training.evaluation.datasets import EvalDataError, build_eval_loader, open_eval_set
from training.files import write_atomic

CLASSES, PER_CLASS, PER_SHARD = ("cat", "dog"), 5, 4


@pytest.fixture(scope="module")
def folder_output(tmp_path_factory):
    """`clip-data folder` on 2 classes x 5 images, 4 per shard: OUT/test/ holds 3 shards and
    their clip_benchmark links 0.tar, 1.tar, 2.tar."""
    work = tmp_path_factory.mktemp("folder")
    for label, name in enumerate(CLASSES):
        (work / "tree" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.new("RGB", (16, 16), (40 * i, 100 * label, 0)).save(work / "tree" / name / f"{i}.png")
    out = work / "out"
    assert main(["folder", str(work / "tree"), str(out), "--samples-per-shard", str(PER_SHARD),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == [
        "0.tar", "1.tar", "2.tar", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    return out


def labels_read(eval_set) -> list[int]:
    loader = build_eval_loader(eval_set, lambda image: torch.zeros(3, 4, 4), batch_size=4)
    return sorted(int(label) for batch in loader for label in batch["label"])


def test_eval_reads_each_image_once_despite_the_0_tar_links(folder_output):
    eval_set = open_eval_set(folder_output / "test")
    assert [os.path.basename(s) for s in eval_set.shards] == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert labels_read(eval_set) == [0] * PER_CLASS + [1] * PER_CLASS  # 10 images, not 20


def test_eval_finds_the_split_inside_the_folder_output(folder_output):
    eval_set = open_eval_set(folder_output)  # the folder the user named in `clip-data folder`
    assert eval_set.path == folder_output / "test" and eval_set.kind == "shards"
    assert eval_set.classnames == list(CLASSES)
    assert labels_read(eval_set) == [0] * PER_CLASS + [1] * PER_CLASS


def test_eval_names_the_splits_when_there_are_several(folder_output, tmp_path):
    root = tmp_path / "two"
    for split in ("test", "train"):
        (root / split).mkdir(parents=True)
        os.link(folder_output / "test" / "shard-000000.tar", root / split / "shard-000000.tar")
    with pytest.raises(EvalDataError) as error:
        open_eval_set(root)
    assert str(error.value) == f"{root} holds the shard splits test, train: name one (e.g. {root / 'test'})"


def test_eval_unbalanced_braces_are_one_line(tmp_path):
    with pytest.raises(EvalDataError) as error:
        open_eval_set(f"{tmp_path}/val-{{000000..000003.tar")
    assert str(error.value) == (f"{tmp_path}/val-{{000000..000003.tar: not a shard pattern: "
                                f"Unbalanced braces: '{tmp_path}/val-{{000000..000003.tar'")


def test_verify_on_the_folder_output_root_says_where_the_shards_are(folder_output, capsys):
    assert main(["verify", str(folder_output)]) == 2
    assert capsys.readouterr().err == (
        f"clip-data verify: error: {folder_output} holds no .tar shards; its split folders "
        f"hold them: verify {folder_output / 'test'}\n")


@pytest.mark.parametrize("command, shown", [
    (["csv"], ["column holding the image path (default: filepath)",
               "column holding the caption (default: caption)",
               "samples per tar file (default: 10000)"]),
    (["synthetic"], ["training samples (default: 10000)", "samples per tar file (default: 1000)",
                     "image side in pixels (default: 64)"]),
])
def test_help_shows_the_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in shown:
        assert phrase in text


def test_clip_inherit_help_shows_defaults_and_the_tinyclip_rule():
    from training.inheritance.cli import build_parser as inherit_parser
    text = " ".join(inherit_parser().format_help().split())
    assert "(default: uniform, spread evenly from first to last)" in text
    assert "'interval' is TinyCLIP's rule" in text and "(default: front, TinyCLIP's slicing)" in text


def test_synthetic_defaults_give_ten_train_shards():
    args = build_parser().parse_args(["synthetic", "out"])
    assert (args.train, args.samples_per_shard) == (10000, 1000)  # 10 train shards: 2 ranks x 2+ workers


def test_progress_bar_counts_whole_samples(tmp_path):
    done = subprocess.run([sys.executable, "-m", "data_tools", "synthetic", str(tmp_path / "s"),
                           "--train", "96", "--val", "0", "--zeroshot", "0"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TQDM_MININTERVAL": "0"})
    assert done.returncode == 0, done.stderr
    assert re.search(r"\b96/96 \[", done.stderr), done.stderr[-500:]
    assert "1.00k" not in done.stderr and "96.0/" not in done.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_weights_files_get_the_umask_mode_not_0600(tmp_path, umask, mode):
    """safetensors writes 0600; exports and inherited weights go through write_atomic."""
    previous = os.umask(umask)
    try:
        path = write_atomic(tmp_path / "w.safetensors",
                            lambda p: save_file({"w": torch.zeros(2)}, str(p)))
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == mode
