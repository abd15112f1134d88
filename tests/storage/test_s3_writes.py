"""`clip-data` writing shard sets to, and `clip-data verify` reading them from, a real S3 server
(moto on 127.0.0.1): the same bytes as a local run, whole uploads only, resume, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.shards import RemotePath, ShardSetWriter
from tests.helpers.s3 import s3_filesystem
from tests.helpers.shards import CountingSource

REPO = Path(__file__).resolve().parents[2]


def clip_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def objects(fs, url: str) -> dict[str, bytes]:
    """Every object under url (recursively), by path relative to it."""
    root = url.removeprefix("s3://")
    fs.invalidate_cache()
    return {path[len(root) + 1:]: fs.cat_file(path) for path in sorted(fs.find(root))}


def write(out, source, **kwargs):
    return ShardSetWriter(out, source="test", arguments={"size": len(source)}, samples_per_shard=10,
                          progress=False, **kwargs).write(source)


class RecordingSource(CountingSource):
    """CountingSource that notes which items it was asked for (in-process writer only)."""

    def __init__(self, size: int, **kwargs):
        super().__init__(size, **kwargs)
        self.asked: list[int] = []

    def sample(self, index: int) -> dict:
        self.asked.append(index)
        return super().sample(index)


def test_clip_data_synthetic_to_s3_equals_the_local_set(s3, tmp_path):
    args = ["--train", "40", "--val", "0", "--zeroshot", "12", "--samples-per-shard", "16",
            "--no-progress"]
    local = clip_data("synthetic", str(tmp_path / "local"), *args)
    remote = clip_data("synthetic", "s3://shards/synthetic", *args, "--workers", "2")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert "-> s3://shards/synthetic/train" in remote.stdout
    fs = s3_filesystem()
    uploaded = objects(fs, "s3://shards/synthetic")
    written = {str(p.relative_to(tmp_path / "local")): p.read_bytes()
               for p in sorted((tmp_path / "local").rglob("*")) if p.is_file()}
    manifests = [name for name in written if name.endswith("manifest.json")]
    assert sorted(uploaded) == sorted(written)   # no .progress/, no probe, no partial object
    assert all(uploaded[name] == written[name] for name in written if name not in manifests)
    for name in manifests:   # the manifests differ only where they name the output folder
        assert json.loads(uploaded[name])["shards"] == json.loads(written[name])["shards"]


def test_interrupted_upload_leaves_no_partial_object_and_resumes(s3, tmp_path):
    fs = s3_filesystem()
    out = RemotePath("s3://shards/resumed")
    clean = write(tmp_path / "clean", CountingSource(45, skip_every=6))
    with pytest.raises(RuntimeError):
        write(out, CountingSource(45, skip_every=6, crash_at=23))  # dies inside shard 2
    assert sorted(objects(fs, out.url)) == [".progress/shard-000000.tar.json",
                                            ".progress/shard-000001.tar.json",
                                            "shard-000000.tar", "shard-000001.tar"]
    source = RecordingSource(45, skip_every=6)
    assert write(out, source) == clean
    assert source.asked == list(range(20, 45))   # shards 0 and 1 were not written again
    uploaded = objects(fs, out.url)
    assert {n: b for n, b in uploaded.items() if n.endswith(".tar")} == {
        p.name: p.read_bytes() for p in sorted((tmp_path / "clean").glob("*.tar"))}
    assert not any(name.startswith(".progress") for name in uploaded)


def test_verify_reads_s3_and_reports_a_corrupt_shard(s3, s3_shards):
    fs = s3_filesystem()
    local = s3_shards["local"]["val"]
    url = "s3://shards/verify-me"
    for path in sorted(local.iterdir()):
        data = path.read_bytes()
        if path.name == "shard-000001.tar":
            data = data[:len(data) // 2]   # cut mid-shard, as a broken copy would be
        fs.pipe_file(f"{url.removeprefix('s3://')}/{path.name}", data)
    fs.rm_file(f"{url.removeprefix('s3://')}/sizes.json")
    result = clip_data("verify", url, "--json", str(Path(s3_shards["local"]["root"]) / "verify.json"))
    assert result.returncode == 1, result.stderr
    report = json.loads((Path(s3_shards["local"]["root"]) / "verify.json").read_text())[0]
    assert report["folder"] == url and report["shards"] == 2
    reasons = {(c["shard"], c["reason"].split(":")[0]) for c in report["corrupt"]}
    assert ("shard-000001.tar", "sha256_mismatch") in reasons
    sizes = json.loads(fs.cat_file(f"{url.removeprefix('s3://')}/sizes.json"))  # rebuilt there
    assert sizes["shard-000000.tar"] == 16 and sizes["shard-000001.tar"] < 8


def test_unwritable_bucket_is_one_line(s3, tmp_path):
    result = clip_data("synthetic", "s3://no-such-bucket/x", "--train", "4", "--val", "0",
                       "--zeroshot", "0", "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "clip-data synthetic: error: output folder s3://no-such-bucket/x is not writable")
