"""The data side of the bad-input zoo (issue 14): each case ends in its exact outcome (exit code,
the one line, the counts, the files left behind), never a traceback, a silent loss or a write
outside the output folder."""
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_tools.captions import clean_caption
from data_tools.cli import main
from tests.helpers.shards import make_synthetic_shards
from training.data import DataConfig, DataError
from training.config_files import ConfigError
from training.data.plan import ShardSizes
from training.data.samples import SampleAccount, read_shard


def run_cli(*args):
    args = [str(a) for a in args]
    return main(args if args[0] == "verify" else args + ["--no-progress"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def png(color=(10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> dict[str, int]:
    """A tar of (name, data); returns the data offset of every member."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: m.offset_data for m in tar.getmembers()}


def three_samples() -> list[tuple[str, bytes]]:
    return [(f"{k:04d}.{ext}", data) for k in range(3)
            for ext, data in (("png", png((k, k, k))), ("txt", f"caption {k}".encode()))]


# ---------------------------------------------------------------- converters


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(png())
    return folder


def karpathy_file(path: Path, **entry) -> Path:
    image = {"split": "test", "filename": "a.png", "sentences": [{"raw": "a caption"}], **entry}
    path.write_text(json.dumps({"dataset": "coco", "images": [image]}))
    return path


def test_karpathy_split_cannot_leave_the_output_folder(tmp_path, image_dir, capsys):
    out = tmp_path / "work" / "deep" / "out"
    annotations = karpathy_file(tmp_path / "k.json", split="../../x")
    assert run_cli("karpathy", out, "--annotations", annotations, "--images", image_dir) == 2
    assert one_line_error(capsys) == (
        f"clip-data karpathy: error: {annotations}: images[0]: 'split': '../../x' is not a plain "
        "folder name (letters, digits, '.', '_', '-', not starting with '.'); folders outside "
        "the output folder are never written")
    assert not list(tmp_path.rglob("*.tar")) and not (tmp_path / "work" / "x").exists()


def test_folder_split_option_cannot_leave_the_output_folder(tmp_path, image_dir, capsys):
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "cat" / "a.png").write_bytes(png())
    assert run_cli("folder", tmp_path / "tree", tmp_path / "out", "--split", "../up") == 2
    assert "--split: '../up' is not a plain folder name" in one_line_error(capsys)
    assert not list(tmp_path.rglob("*.tar"))


@pytest.mark.parametrize("entry, line", [
    ({"filepath": 7}, "images[0]: 'filepath' must be str, got int 7"),
    ({"cocoid": [1]}, "images[0]: 'cocoid' must be int or str, got list [1]"),
    ({"split": 3}, "images[0]: 'split' must be a str, got int"),
])
def test_karpathy_keys_of_the_wrong_type_are_one_line(tmp_path, image_dir, capsys, entry, line):
    annotations = karpathy_file(tmp_path / "k.json", **entry)
    assert run_cli("karpathy", tmp_path / "out", "--annotations", annotations,
                   "--images", image_dir) == 2
    assert one_line_error(capsys) == f"clip-data karpathy: error: {annotations}: {line}"
    assert not list(tmp_path.rglob("*.tar"))


@pytest.mark.parametrize("images, annotations, line", [
    ([{"id": [1], "file_name": "a.png"}], [], "images[0]: 'id' must be int or str, got list [1]"),
    ([{"id": 1, "file_name": "a.png"}], [{"id": 5, "image_id": {"a": 1}, "caption": "x"}],
     "annotations[0]: 'image_id' must be int or str, got dict {\"a\": 1}"),
    ([{"id": 1.5, "file_name": "a.png"}], [], "images[0]: 'id' must be int or str, got float 1.5"),
])
def test_coco_ids_of_the_wrong_type_are_one_line(tmp_path, image_dir, capsys, images,
                                                 annotations, line):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    assert run_cli("coco", tmp_path / "out", "--captions", captions, "--images", image_dir) == 2
    assert one_line_error(capsys) == f"clip-data coco: error: {captions}: {line}"
    assert not list(tmp_path.rglob("*.tar"))


def test_a_200_kb_caption_does_not_stop_the_table(tmp_path, image_dir):
    long_caption = "word " * 40_000  # 200,000 characters, over the csv module's 128 KiB default
    table = tmp_path / "table.csv"
    table.write_text("filepath,caption\n" + f"images/a.png,short one\nimages/a.png,{long_caption}\n"
                     + "images/a.png,another short one\n")
    out = tmp_path / "out"
    assert run_cli("csv", table, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["written"], manifest["skipped"]) == (3, {})
    with tarfile.open(out / "shard-000000.tar") as tar:
        captions = sorted(tar.extractfile(m).read().decode() for m in tar.getmembers()
                          if m.name.endswith(".txt"))
    assert captions == ["another short one", "short one", long_caption.strip()]


def test_a_caption_holding_u_fffd_is_kept_and_bad_bytes_are_still_counted(tmp_path, image_dir):
    assert clean_caption("the \ufffd sign ") == "the \ufffd sign"
    assert clean_caption("the \ufffd sign".encode()) == "the \ufffd sign"
    table = tmp_path / "table.csv"
    table.write_bytes("filepath,caption\nimages/a.png,a \ufffd in the source\n".encode()
                      + b"images/a.png,latin-1 caf\xe9\n")
    out = tmp_path / "out"
    assert run_cli("csv", table, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["written"], manifest["skipped"]) == (1, {"non_utf8_caption": 1})
    with tarfile.open(out / "shard-000000.tar") as tar:
        texts = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert texts == ["a \ufffd in the source".encode()]


# ---------------------------------------------------------------- shards and listings


def test_a_tar_cut_mid_member_keeps_every_complete_sample_and_counts_the_cut_one(tmp_path):
    whole = tmp_path / "whole.tar"
    offsets = write_tar(whole, three_samples())
    data = whole.read_bytes()
    # cut inside the first member of sample 2: samples 0 and 1 are complete
    (tmp_path / "a.tar").write_bytes(data[:offsets["0002.png"] + 10])
    # cut inside the second member of sample 2: sample 2 has its image but no caption
    (tmp_path / "b.tar").write_bytes(data[:offsets["0002.txt"] + 3])
    for name in ("a.tar", "b.tar"):
        url = str(tmp_path / name)
        account = SampleAccount()
        keys = [raw["__key__"] for raw in read_shard(url, account)]
        assert keys == ["0000", "0001"], name
        assert dict(account.skipped) == {"truncated_sample": 1}
        assert dict(account.shard_errors) == {url: 1}
    # verify: the two complete samples are valid; the cut one is not counted as valid
    for name, corrupt in (("a.tar", []), ("b.tar", [{"key": "0002", "reason": "no_caption"}])):
        folder = tmp_path / name.replace(".tar", "-set")
        folder.mkdir()
        (folder / name).write_bytes((tmp_path / name).read_bytes())
        assert run_cli("verify", folder) == 1
        sizes = json.loads((folder / "sizes.json").read_text())
        assert sizes == {name: 2}


def test_verify_does_not_count_an_image_without_caption(tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    write_tar(folder / "00000.tar", [("a.png", png()), ("a.txt", b"a caption"),
                                     ("b.png", png()),                        # no caption at all
                                     ("c.png", png()), ("c.txt", b"  \n"),    # blank caption
                                     ("d.png", png()), ("d.json", b'{"captions": ["from json"]}'),
                                     ("e.png", png()), ("e.cls", b"3")])      # labelled set
    assert run_cli("verify", folder) == 1
    out = capsys.readouterr().out
    assert f"{folder}: 1 shards, 5 samples, 3 valid, 2 corrupt" in out
    assert "CORRUPT 00000.tar b: no_caption" in out and "CORRUPT 00000.tar c: no_caption" in out
    assert json.loads((folder / "sizes.json").read_text()) == {"00000.tar": 3}


@pytest.fixture
def synthetic(tmp_path):
    return make_synthetic_shards(tmp_path / "syn", train=96, val=0, zeroshot=0,
                                 samples_per_shard=32)


def test_verify_reports_a_sizes_json_listing_too_few_and_rewrites_it(synthetic, capsys):
    folder = synthetic["train"]
    (folder / "sizes.json").write_text(json.dumps(
        {"shard-000000.tar": 16, "shard-000001.tar": 32, "shard-000002.tar": 32}))
    assert run_cli("verify", folder) == 1
    out = capsys.readouterr().out
    assert ("CORRUPT shard-000000.tar -: sizes_json_mismatch: sizes.json lists 16, 32 valid"
            in out)
    assert f"{folder}: 3 shards, 96 samples, 96 valid, 1 corrupt" in out
    assert json.loads((folder / "sizes.json").read_text()) == {
        "shard-000000.tar": 32, "shard-000001.tar": 32, "shard-000002.tar": 32}
    assert run_cli("verify", folder) == 0  # fixed


def test_planning_warns_about_a_sizes_json_listing_too_few(synthetic, caplog):
    folder = synthetic["train"]
    (folder / "sizes.json").write_text(json.dumps(
        {"shard-000000.tar": 16, "shard-000001.tar": 16, "shard-000002.tar": 16}))
    sizes = ShardSizes()
    with caplog.at_level(logging.WARNING, logger="training.data.plan"):
        listed = [sizes(str(folder / f"shard-00000{i}.tar")) for i in range(3)]
    assert listed == [16, 16, 16]
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder}/shard-000000.tar holds 32 samples, its sizes.json lists 16: unless the "
        f"difference is corrupt samples, every epoch is shorter than the data; `clip-data verify "
        f"{folder}` rebuilds sizes.json"]  # once per folder


@pytest.mark.parametrize("value", ["abc", -3, 2.5, None, True])
def test_a_bad_sizes_json_value_is_one_line_naming_file_and_key(synthetic, value):
    folder = synthetic["train"]
    (folder / "sizes.json").write_text(json.dumps(
        {"shard-000000.tar": value, "shard-000001.tar": 32, "shard-000002.tar": 32}))
    with pytest.raises(DataError) as error:
        ShardSizes()(str(folder / "shard-000000.tar"))
    assert str(error.value) == (
        f"{folder}/sizes.json: 'shard-000000.tar' must be a sample count (an integer >= 0), "
        f"got {value!r}; rebuild it with clip-data verify")


def test_unbalanced_braces_in_data_train_name_the_key():
    with pytest.raises(ConfigError) as error:
        DataConfig(train="/data/shard-{000000..000009.tar").validate()
    assert str(error.value) == (
        "key data.train: unbalanced braces in '/data/shard-{000000..000009.tar' (a shard pattern "
        "looks like DIR/shard-{000000..000009}.tar)")
