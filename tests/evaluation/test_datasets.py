"""The evaluation reader: every sample exactly once across ranks and workers, captions and
labels intact, caps and skips counted, ImageFolder trees, bad sets named."""
import io
import tarfile
from collections import Counter

import pytest
import torch

from training.evaluation.datasets import EvalDataError, build_eval_loader, open_eval_set


def to_tensor(image):
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


def keys_of(eval_set, world_size, workers=0, max_samples=None, batch_size=4):
    per_rank, captions, skipped = [], {}, Counter()
    for rank in range(world_size):
        loader = build_eval_loader(eval_set, to_tensor, batch_size, workers, rank, world_size,
                                   max_samples)
        keys = []
        for batch in loader:
            keys += batch["key"]
            captions.update(zip(batch["key"], batch["captions"]))
            skipped.update(batch["skipped"])
        per_rank.append(keys)
    return per_rank, captions, skipped


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 0), (3, 0), (2, 2), (5, 0)])
def test_each_sample_exactly_once(eval_sets, world_size, workers):
    # 24 samples in 3 shards: 1-3 readers get whole shards, 4-5 readers split samples.
    eval_set = open_eval_set(eval_sets["val"])
    per_rank, captions, _ = keys_of(eval_set, world_size, workers)
    all_keys = [k for keys in per_rank for k in keys]
    assert sorted(all_keys) == [f"v{i:05d}" for i in range(24)]
    assert all(per_rank), "every rank got some samples"
    assert captions["v00003"] == [f"picture 3 number {j}: a yellow square" for j in range(5)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_max_samples_is_the_same_first_samples_on_any_world_size(eval_sets, world_size):
    per_rank, _, _ = keys_of(open_eval_set(eval_sets["zeroshot"]), world_size, max_samples=13)
    assert sorted(k for keys in per_rank for k in keys) == [f"s{i:05d}" for i in range(13)]


def test_labelled_set_metadata_and_labels(eval_sets):
    eval_set = open_eval_set(eval_sets["zeroshot"])
    assert eval_set.kind == "shards" and len(eval_set.shards) == 3
    assert eval_set.classnames[:3] == ["red", "green", "blue"]
    assert eval_set.templates[0] == "a photo of a {c} square."
    batch = next(iter(build_eval_loader(eval_set, to_tensor, 8)))
    assert batch["label"].tolist() == [i % 7 for i in range(8)]
    assert batch["image"][0, 0] > 150 and batch["image"][1, 1] > 120   # red, then green


def test_imagefolder_tree(eval_sets):
    eval_set = open_eval_set(eval_sets["imagefolder"])
    assert eval_set.kind == "imagefolder"
    assert eval_set.classnames == sorted(["red", "green", "blue", "yellow", "purple", "white",
                                          "black"])
    per_rank, _, _ = keys_of(eval_set, 2)
    assert len(per_rank[0]) + len(per_rank[1]) == 21 and len(per_rank[0]) == 11
    batch = next(iter(build_eval_loader(eval_set, to_tensor, 21)))
    names = [eval_set.classnames[i] for i in batch["label"]]
    assert all(key.startswith(name + "/") for key, name in zip(batch["key"], names))


def test_corrupt_and_imageless_samples_are_counted_skips(tmp_path, eval_sets):
    good = sorted(eval_sets["val"].glob("*.tar"))[0]
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.startswith("v00001.png"):
                data = b"not an image"
            if member.name.startswith("v00002.png"):
                continue
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    per_rank, _, skipped = keys_of(open_eval_set(tmp_path), 1)
    assert len(per_rank[0]) == 6
    assert skipped == {"undecodable image": 1, "no image": 1}


def test_bad_sets_are_named(tmp_path):
    with pytest.raises(EvalDataError, match="nowhere: evaluation set not found"):
        open_eval_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="no .tar shards and no class folders"):
        open_eval_set(tmp_path / "empty")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x-000000.tar").write_bytes(b"")
    (tmp_path / "t" / "zeroshot_classification_templates.txt").write_text("a photo\n")
    with pytest.raises(EvalDataError, match="template without"):
        open_eval_set(tmp_path / "t")


def test_brace_pattern_of_shards(eval_sets):
    folder = eval_sets["zeroshot"]
    eval_set = open_eval_set(f"{folder}/zs-{{000000..000001}}.tar")
    assert [p.rsplit("/", 1)[1] for p in eval_set.shards] == ["zs-000000.tar", "zs-000001.tar"]
    assert eval_set.classnames[0] == "red"
    per_rank, _, _ = keys_of(eval_set, 1)
    assert len(per_rank[0]) == 20
    with pytest.raises(EvalDataError, match=r"shard .*zs-000003.tar not found \(and 6 more\)"):
        open_eval_set(f"{folder}/zs-{{000000..000009}}.tar")
