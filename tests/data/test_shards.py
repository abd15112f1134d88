"""ShardSetWriter: the deterministic plan, parallel workers, resume, sizes.json/manifest.json,
unusable outputs."""
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from data_tools.errors import DataError
from data_tools.shards import ShardSetWriter
from tests.helpers.shards import CountingSource


def write(out, source, **kwargs):
    kwargs.setdefault("samples_per_shard", 10)
    kwargs.setdefault("progress", False)
    return ShardSetWriter(out, source="test", arguments={"size": len(source)}, **kwargs).write(
        source)


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.tar"))}


def tar_keys(path):
    with tarfile.open(path) as tar:
        return [m.name for m in tar.getmembers()]


def test_plan_sizes_and_manifest(tmp_path):
    manifest = write(tmp_path, CountingSource(35, skip_every=7))
    names = [f"shard-{i:06d}.tar" for i in range(4)]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == names
    # items 0, 7, 14, 21, 28 are skipped; item i lands in shard i // 10
    expected = {names[0]: 8, names[1]: 9, names[2]: 8, names[3]: 5}
    assert json.loads((tmp_path / "sizes.json").read_text()) == expected
    assert manifest == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["written"] == 30 and manifest["items"] == 35
    assert manifest["skipped"] == {"test_skip": 5}
    assert [e["item"] for e in manifest["skipped_examples"]["test_skip"]] == [
        "item 0", "item 7", "item 14", "item 21", "item 28"]
    assert [s["count"] for s in manifest["shards"]] == list(expected.values())
    keys = set()
    for shard, name in enumerate(names):
        members = tar_keys(tmp_path / name)
        shard_keys = {m.split(".")[0] for m in members}
        assert all(int(k) // 10 == shard for k in shard_keys)
        assert all(m.count(".") == 1 for m in members)  # keys contain no dots
        keys |= shard_keys
    assert len(keys) == 30
    assert not (tmp_path / ".progress").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_tar_members_are_deterministic_and_readable_by_webdataset(tmp_path):
    import webdataset as wds

    write(tmp_path, CountingSource(12))
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        infos = tar.getmembers()
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {
        (0, 0, 0, "", "", 0o644)}
    samples = list(wds.WebDataset(str(tmp_path / "shard-{000000..000001}.tar"),
                                  shardshuffle=False))
    assert [s["txt"].decode() for s in samples] == [f"item {i}" for i in range(12)]
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(12)]


def test_two_workers_give_the_same_bytes_as_one(tmp_path):
    one = write(tmp_path / "one", CountingSource(95, skip_every=4), workers=1)
    two = write(tmp_path / "two", CountingSource(95, skip_every=4), workers=2)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert one == two
    assert (tmp_path / "one" / "manifest.json").read_bytes() == \
        (tmp_path / "two" / "manifest.json").read_bytes()


def test_crash_then_rerun_keeps_finished_shards_and_matches_a_clean_run(tmp_path):
    clean = write(tmp_path / "clean", CountingSource(45, skip_every=6))
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError):
        write(out, CountingSource(45, skip_every=6, crash_at=23))  # dies inside shard 2
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert (out / ".shard-000002.tar.partial").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    resumed = write(out, CountingSource(45, skip_every=6))
    assert {p: (out / p).stat().st_mtime_ns for p in finished} == finished  # not rewritten
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert resumed == clean
    assert not list(out.glob(".*partial"))


def test_rerun_of_a_finished_set_rewrites_no_shard(tmp_path):
    first = write(tmp_path, CountingSource(25, skip_every=3))
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    assert write(tmp_path, CountingSource(25, skip_every=3)) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == stamps


def test_a_damaged_finished_shard_is_redone(tmp_path):
    write(tmp_path, CountingSource(25))
    reference = shard_bytes(tmp_path)
    (tmp_path / "shard-000001.tar").write_bytes(b"garbage")
    write(tmp_path, CountingSource(25))
    assert shard_bytes(tmp_path) == reference


def test_other_arguments_are_refused_unless_overwrite(tmp_path):
    write(tmp_path, CountingSource(25))
    with pytest.raises(DataError, match="different arguments.*--overwrite"):
        write(tmp_path, CountingSource(15))
    manifest = write(tmp_path, CountingSource(15), overwrite=True)
    assert manifest["written"] == 15
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar",
                                                              "shard-000001.tar"]


def test_empty_source_writes_an_empty_set(tmp_path):
    manifest = write(tmp_path, CountingSource(0))
    assert manifest["written"] == 0 and manifest["shards"] == []
    assert json.loads((tmp_path / "sizes.json").read_text()) == {}


@pytest.mark.parametrize("kwargs, match", [
    ({"samples_per_shard": 0}, "samples-per-shard"),
    ({"workers": 0}, "workers"),
    ({"prefix": "a.b"}, "prefix"),
])
def test_bad_writer_options(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        write(tmp_path, CountingSource(3), **kwargs)


def test_output_under_a_regular_file_is_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"output folder .*file/out is not writable"):
        write(tmp_path / "file" / "out", CountingSource(3))


def mounted_tmpfs(path, options):
    """A tmpfs at path (CI runs as root); the test is skipped where mounting is not allowed."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    return path


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB file system."""
    yield mounted_tmpfs(tmp_path / "tiny", "size=64k")
    subprocess.run(["umount", str(tmp_path / "tiny")], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system: refused even to root, unlike permission bits."""
    yield mounted_tmpfs(tmp_path / "ro", "ro,size=64k")
    subprocess.run(["umount", str(tmp_path / "ro")], check=True)


def test_read_only_output_is_refused_before_work(read_only_dir):
    with pytest.raises(DataError, match="ro is not writable: Read-only file system"):
        write(read_only_dir, CountingSource(3))


def test_full_disk_is_a_clean_error_and_keeps_finished_shards(tiny_disk):
    class Big(CountingSource):
        def sample(self, index):
            return {"bin": bytes(6000) + index.to_bytes(4, "big")}

    with pytest.raises(DataError, match="disk full while writing .*rerun the same command"):
        write(tiny_disk, Big(40), samples_per_shard=2)
    finished = sorted(p.name for p in tiny_disk.glob("*.tar"))
    assert finished and "shard-000019.tar" not in finished
    assert not list(tiny_disk.glob(".*partial"))
