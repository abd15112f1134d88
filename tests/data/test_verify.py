"""verify: decodes every sample, reports corrupt ones by shard and key, checks sha256 against
the manifest, rebuilds sizes.json, and exits non-zero on corruption unless --report-only."""
import io
import json
import tarfile

from data_tools.cli import main
from data_tools.verify import verify_folder
from tests.helpers.shards import make_synthetic_shards


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_clean_set_verifies_with_stats(tmp_path, capsys):
    paths = make_synthetic_shards(tmp_path, train=100, val=0, zeroshot=20, samples_per_shard=40)
    (paths["train"] / "sizes.json").unlink()
    assert main(["verify", str(paths["train"]), str(paths["zeroshot"]),
                 "--json", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "3 shards, 100 samples, 100 valid, 0 corrupt" in out
    assert "image width: min 64 mean 64 max 64" in out
    report = json.loads((tmp_path / "report.json").read_text())[0]
    assert report["caption_chars"]["min"] > 10
    assert json.loads((paths["train"] / "sizes.json").read_text()) == {
        "shard-000000.tar": 40, "shard-000001.tar": 40, "shard-000002.tar": 20}


def test_corrupt_samples_are_reported_by_shard_and_key(tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    good = make_synthetic_shards(tmp_path / "syn", train=3, val=0, zeroshot=0)
    with tarfile.open(good["train"] / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    with tarfile.open(folder / "00000.tar", "w") as tar:   # img2dataset-style names
        for name, data in members.items():
            if name.startswith("000000000."):
                add_member(tar, name, data)
        add_member(tar, "b.jpg", members["000000001.jpg"][:200])     # truncated image
        add_member(tar, "b.txt", b"fine")
        add_member(tar, "c.jpg", members["000000002.jpg"])
        add_member(tar, "c.txt", b"\xff\xfe")                           # not UTF-8
        add_member(tar, "d.txt", b"no image at all")
    whole = (folder / "00000.tar").read_bytes()
    (folder / "00001.tar").write_bytes(whole[: len(whole) // 3])       # a cut-off tar
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT 00000.tar b: bad_jpg" in out
    assert "CORRUPT 00000.tar c: bad_txt" in out
    assert "CORRUPT 00000.tar d: no_image" in out
    assert "CORRUPT 00001.tar <tar>: unreadable_tar" in out
    assert "exit 1; --report-only" in out
    assert main(["verify", str(folder), "--report-only"]) == 0
    sizes = json.loads((folder / "sizes.json").read_text())
    assert sizes["00000.tar"] == 1


def test_manifest_mismatch_and_missing_shard(tmp_path):
    paths = make_synthetic_shards(tmp_path, train=50, val=0, zeroshot=0, samples_per_shard=20)
    train = paths["train"]
    shard = train / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-1] = 1  # a flipped byte in the tar's zero padding: every sample still decodes
    shard.write_bytes(bytes(data))
    (train / "shard-000002.tar").rename(train / "elsewhere.bin")
    report = verify_folder(train)
    reasons = {(c["shard"], c["reason"]) for c in report["corrupt"]}
    assert reasons == {("shard-000001.tar", "sha256_mismatch"),
                       ("shard-000002.tar", "missing_shard")}
    assert report["valid"] == 40


def test_verify_bad_folder_is_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "holds no .tar shards" in capsys.readouterr().err
