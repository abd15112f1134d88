"""Training and evaluation reads from a real S3 server (moto on 127.0.0.1): the same batches as
from local files, faults retried and counted, permanent failures and stalls one line."""
from __future__ import annotations

import logging

import pytest
import torch

from tests.helpers.data_pipeline import train_loader
from training.data import DataConfig, DataError
from training.data.sources import ReadPolicy, configure_reads, open_url

BATCH = 8
FAST_RETRIES = dict(read_timeout_s=5, read_retries=3, retry_backoff_s=0.01)


def epoch(spec: str, **cfg) -> tuple[list[dict], dict]:
    loader = train_loader(DataConfig(**{"train": spec, "batch_size": BATCH, "workers": 0, **FAST_RETRIES,
                                        **cfg}))
    batches = list(loader)
    return batches, loader.stats()


def same_batches(batches: list[dict], reference: list[dict]) -> bool:
    return ([b["key"] for b in batches] == [b["key"] for b in reference]
            and all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, reference)))


@pytest.fixture(scope="module")
def local_epoch(s3_shards):
    return epoch(s3_shards["local"]["train_shards"])[0]


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_s3_epoch_equals_local_epoch(s3_shards, local_epoch, read_ahead, caplog):
    with caplog.at_level(logging.WARNING):
        batches, stats = epoch(s3_shards["train"], read_ahead=read_ahead)
    assert same_batches(batches, local_epoch)
    assert len({k for b in batches for k in b["key"]}) == 128
    assert stats["read_retries"] == 0 and stats["shard_errors"] == 0
    assert "counting its samples" not in caplog.text  # sizes.json came from the bucket


def test_resampled_s3_stream_equals_local_stream(s3_shards):
    """Read-ahead draws the next shards early from the same seeded RNG: the stream is unchanged."""
    cfg = dict(resampled=True, samples_per_epoch=96, read_ahead=2)
    local, _ = epoch(s3_shards["local"]["train_shards"], **cfg)
    remote, stats = epoch(s3_shards["train"], **cfg)
    assert len(remote) == 12 and same_batches(remote, local) and stats["read_retries"] == 0


@pytest.mark.parametrize("fault,workers", [("error", 0), ("drop", 1), ("stall", 0)])
def test_injected_faults_are_retried_and_counted(s3, s3_shards, local_epoch, fault, workers):
    """Every 3rd shard GET fails (500 / connection dropped mid-body / no answer within the
    timeout); each failure is one retry in the loader's stats, and the epoch is unchanged."""
    s3.faults(**{f"{fault}_every": 3, "stall_s": 3})
    batches, stats = epoch(s3_shards["train"], workers=workers, read_ahead=1,
                           **({"read_timeout_s": 1} if fault == "stall" else {}))
    injected = s3.injected()
    assert injected.get(fault, 0) >= 2 and set(injected) == {fault}
    assert stats["read_retries"] == injected[fault]
    assert [b["key"] for b in batches] == [b["key"] for b in local_epoch]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, local_epoch))


def test_missing_object_is_one_line_naming_it(s3_shards):
    spec = s3_shards["train"].replace("shard-{000000..000007}", "shard-{000000..000008}")
    assert spec != s3_shards["train"]
    with pytest.raises(DataError) as error:
        epoch(spec)
    assert str(error.value) == "s3://shards/train/shard-000008.tar: not found"


def test_failures_beyond_the_retries_are_one_line(s3, s3_shards):
    s3.faults(error_every=1)
    with pytest.raises(DataError) as error:
        epoch(s3_shards["train"], read_retries=2)
    message = str(error.value)
    assert "\n" not in message and message.startswith("s3://shards/train/shard-0000")
    assert "InternalError" in message or "injected" in message
    assert "gave up after 2 retries" in message
    assert s3.injected() == {"error": 3}  # the first attempt and 2 retries, then the stop


def test_stalled_pipe_command_is_one_line_not_a_hang(tmp_path):
    """Issue 14: `pipe:CMD` that never writes used to hang while its samples were counted."""
    with pytest.raises(DataError) as error:
        epoch("pipe:sleep 600", read_timeout_s=0.5, read_retries=1, retry_backoff_s=0)
    assert str(error.value) == ("pipe:sleep 600: TimeoutError: command gave no data for 0.5 s "
                                "(gave up after 1 retries; read timeout 0.5 s)")


def test_pipe_that_stalls_mid_shard_resumes_where_it_stopped(s3_shards, tmp_path):
    """A command that stalls after some bytes once (a flag file) is run again and its first
    bytes skipped: the stream is the shard's bytes exactly, with one retry counted."""
    shard = sorted(s3_shards["local"]["train"].glob("*.tar"))[0]
    flag = tmp_path / "stalled-once"
    command = (f"pipe:if [ -e {flag} ]; then cat {shard}; else touch {flag}; head -c 5000 {shard}; "
               f"sleep 600; fi")
    configure_reads(ReadPolicy(timeout_s=0.5, retries=2, backoff_s=0))
    from training.data.sources import read_retries
    with open_url(command) as stream:
        assert stream.read() == shard.read_bytes()
    assert read_retries() == 1


def test_clip_eval_dataset_reads_an_s3_folder(s3_shards):
    from training.evaluation.datasets import open_eval_set

    remote, local = open_eval_set(s3_shards["zeroshot"]), open_eval_set(s3_shards["local"]["zeroshot"])
    assert [url.rsplit("/", 1)[1] for url in remote.shards] == [
        url.rsplit("/", 1)[1] for url in local.shards]
    assert remote.shards[0].startswith("s3://shards/zeroshot/")
    assert remote.classnames == local.classnames and remote.templates == local.templates


@pytest.mark.parametrize("workers", [0, 1])
def test_two_ranks_read_every_sample_once_from_s3(s3_shards, workers):
    keys = []
    for rank in (0, 1):
        loader = train_loader(DataConfig(train=s3_shards["train"], batch_size=BATCH, workers=workers,
                                         **FAST_RETRIES), rank=rank, world_size=2)
        keys.append([k for batch in loader for k in batch["key"]])
        assert loader.stats()["samples_dropped"] == 0
    assert len(keys[0]) == len(keys[1]) == 64
    assert len(set(keys[0]) | set(keys[1])) == 128   # 128 distinct keys in 128 samples: each once
