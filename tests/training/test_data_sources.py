"""Where shards come from (pipe:, file://, http://, img2dataset output) and what happens to
corrupt samples and broken shards."""
from __future__ import annotations

import json
import tarfile

import pytest
import torch

from tests.helpers.data_pipeline import jpeg_bytes, train_loader, write_img2dataset_shard, write_tar
from tests.helpers.http_server import ImageServer, Route
from tests.helpers.shards import make_synthetic_shards
from training.data import CorruptDataError, DataConfig, DataError

BATCH = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("synthetic"), train=128, val=0, zeroshot=0,
                                 samples_per_shard=32)


def run(spec: str, **cfg) -> list[dict]:
    return list(train_loader(DataConfig(**dict(dict(train=spec, batch_size=BATCH, workers=0), **cfg)), seed=1))


@pytest.fixture(scope="module")
def local_epoch(shards):
    return run(shards["train_shards"])


def same_epoch(batches: list[dict], reference: list[dict]) -> bool:
    return ([b["key"] for b in batches] == [b["key"] for b in reference]
            and all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, reference)))


def test_local_epoch_reads_all_samples(local_epoch):
    assert len({k for b in local_epoch for k in b["key"]}) == 128


def test_a_folder_or_a_glob_is_the_same_epoch_as_the_brace_pattern(shards, local_epoch, tmp_path):
    folder = shards["train"]
    assert same_epoch(run(str(folder)), local_epoch)
    assert same_epoch(run(str(folder / "shard-*.tar")), local_epoch)
    linked = tmp_path / "linked"  # a shard and clip_benchmark's 0.tar link to it: read once
    linked.mkdir()
    first = sorted(folder.glob("shard-*.tar"))[0]
    (linked / first.name).write_bytes(first.read_bytes())
    (linked / "0.tar").symlink_to(linked / first.name)
    assert sum(len(b["key"]) for b in run(str(linked))) == 32
    with pytest.raises(DataError, match=f"folder {tmp_path / 'empty'} holds no .tar shards"):
        (tmp_path / "empty").mkdir()
        run(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no shard matches"):
        run(str(folder / "nothing-*.tar"))


def test_pipe_command_source(shards, local_epoch):
    assert same_epoch(run("pipe:cat " + shards["train_shards"]), local_epoch)


def test_file_url_source_through_fsspec(shards, local_epoch):
    assert same_epoch(run("file://" + shards["train_shards"]), local_epoch)


def test_http_source(shards, local_epoch):
    folder = shards["train"]
    routes = {f"/train/{path.name}": Route(path.read_bytes(), content_type="application/x-tar")
              for path in folder.glob("*.tar")}
    routes["/train/sizes.json"] = Route((folder / "sizes.json").read_bytes(), content_type="application/json")
    with ImageServer(routes) as server:
        spec = server.url("/train/") + shards["train_shards"].rsplit("/", 1)[1]
        batches = run(spec)
        assert server.hits["/train/sizes.json"] == 1  # sizes came from sizes.json, not by counting
    assert same_epoch(batches, local_epoch)


@pytest.mark.parametrize("with_stats", [True, False])
def test_img2dataset_output_is_readable(tmp_path, with_stats, caplog):
    for shard, count in [(0, 20), (1, 12)]:
        write_img2dataset_shard(tmp_path, shard, count, stats=with_stats)
    with caplog.at_level("WARNING"):
        batches = run(f"{tmp_path}/{{00000..00001}}.tar", shuffle_buffer=0)
    pairs = [(k, c) for b in batches for k, c in zip(b["key"], b["caption"])]
    assert len(pairs) == 32 and len({k for k, _ in pairs}) == 32
    assert all(caption == f"photo {key}" for key, caption in pairs)
    # the sizes came from img2dataset's *_stats.json when present, not from counting the shards
    assert ("counting its samples" in caplog.text) == (not with_stats)


def corrupt_shard(path, count: int = 40) -> dict[str, int]:
    """A shard with broken samples at known places; returns the expected skip counts."""
    samples, expected = [], {"undecodable_image": 0, "missing_caption": 0, "missing_image": 0}
    for index in range(count):
        sample = {"__key__": f"s{index:04d}", "jpg": jpeg_bytes(index), "txt": f"caption {index}"}
        if index % 10 == 3:
            sample["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
            expected["undecodable_image"] += 1
        elif index % 10 == 6:
            sample["jpg"] = jpeg_bytes(index)[:120]  # the header parses, the pixels do not
            expected["undecodable_image"] += 1
        elif index == 8:
            del sample["txt"]
            expected["missing_caption"] += 1
        elif index == 9:
            del sample["jpg"]
            expected["missing_image"] += 1
        samples.append(sample)
    write_tar(path, samples)
    return expected


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_samples_are_skipped_and_counted(tmp_path, workers):
    expected = corrupt_shard(tmp_path / "bad-0.tar")
    loader = train_loader(DataConfig(train=str(tmp_path / "bad-0.tar"), batch_size=BATCH, workers=workers,
                               max_corrupt_fraction=0.5, corrupt_min_samples=10, shuffle_buffer=0))
    keys = [k for batch in loader for k in batch["key"]]
    bad = {f"s{i:04d}" for i in range(40) if i % 10 in (3, 6) or i in (8, 9)}
    # 40 samples listed, 30 usable: the rank still delivers its 5 planned batches by reading
    # 10 usable samples a second time (counted), and counts each corrupt sample once.
    assert len(keys) == len(loader) * BATCH == 40 and len(set(keys)) == 30 and not set(keys) & bad
    stats = loader.stats()
    assert stats["corrupt_by_reason"] == expected
    assert stats["corrupt_skipped"] == sum(expected.values()) == 10
    assert stats["samples_repeated"] == 10 and stats["samples_read"] == 40


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_corrupt_samples_stop_with_a_clear_error(tmp_path, workers):
    corrupt_shard(tmp_path / "bad-0.tar")
    loader = train_loader(DataConfig(train=str(tmp_path / "bad-0.tar"), batch_size=BATCH, workers=workers,
                               max_corrupt_fraction=0.1, corrupt_min_samples=20, shuffle_buffer=0))
    with pytest.raises(CorruptDataError) as error:
        list(loader)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert "data.max_corrupt_fraction=0.1" in message and str(tmp_path / "bad-0.tar") in message


@pytest.mark.parametrize("where", ["inside_a_member", "between_members"])
def test_truncated_shard_is_counted_and_ranks_still_get_their_batches(shards, tmp_path, where):
    good = sorted(shards["train"].glob("*.tar"))
    (tmp_path / "shard-000000.tar").write_bytes(good[0].read_bytes())
    with tarfile.open(good[1]) as tar:  # cut in the data of the 10th member, or at its header
        member = tar.getmembers()[10]
        cut = member.offset_data + 100 if where == "inside_a_member" else member.offset
    (tmp_path / "shard-000001.tar").write_bytes(good[1].read_bytes()[:cut])
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 32, "shard-000001.tar": 32}))
    loader = train_loader(DataConfig(train=f"{tmp_path}/shard-{{000000..000001}}.tar", batch_size=BATCH,
                               workers=0, shuffle_buffer=0))
    batches = list(loader)
    assert len(batches) == len(loader) == 64 // BATCH
    stats = loader.stats()
    assert stats["shard_errors"] == 1 and stats["samples_repeated"] > 0


def test_corrupt_samples_before_the_minimum_still_count(tmp_path):
    """All the bad samples come first: the check must run when the minimum is reached."""
    samples = [{"__key__": f"s{i:04d}", "jpg": jpeg_bytes(i), **({"txt": "a caption"} if i >= 4 else {})}
               for i in range(40)]
    write_tar(tmp_path / "early-0.tar", samples)
    loader = train_loader(DataConfig(train=str(tmp_path / "early-0.tar"), batch_size=BATCH, workers=0,
                               max_corrupt_fraction=0.1, corrupt_min_samples=20, shuffle_buffer=0))
    with pytest.raises(CorruptDataError, match=r"4 of 20 samples unusable \(missing_caption=4\)"):
        list(loader)
