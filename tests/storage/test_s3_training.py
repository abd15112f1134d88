"""End to end on a real S3 server (moto on 127.0.0.1): 2 torchrun ranks train one exact epoch
from s3:// shards while the server fails some shard reads, and `clip-eval` scores the run on
s3:// evaluation sets with the same numbers as on the local copies. (That an s3:// epoch is
the local epoch batch for batch is tests/storage/test_s3_reads.py.)"""
from __future__ import annotations

import json

import pytest

from tests.helpers.torchrun import run_torchrun
from tests.helpers.trainer import TINY_CLIP, read_metrics, step_losses, tiny_overrides

pytestmark = pytest.mark.slow
STEPS = 8  # 128 samples, batch 8, 2 ranks: one exact epoch


def train(train_spec: str, run_dir) -> None:
    run_torchrun(["-m", "training", "--config", TINY_CLIP,
                  *tiny_overrides(train_spec, run_dir, steps=STEPS), "data.read_retries=3",
                  "data.retry_backoff_s=0.01", "data.read_timeout_s=10"], nproc=2, timeout=400)


def clip_eval(run_dir, zeroshot: str, retrieval: str, out) -> dict:
    """`clip-eval eval` in this process; the zero-shot and retrieval parts of its record."""
    from training.evaluation.cli import main

    assert main(["eval", "--checkpoint", str(run_dir), "--zeroshot", zeroshot, "--retrieval",
                 retrieval, "--batch-size", "8", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    return {task: {k: v for k, v in record[task].items() if k != "dataset"}  # the set's path
            for task in ("zeroshot", "retrieval")}


def test_two_ranks_train_an_exact_epoch_from_s3_with_faults_and_clip_eval_reads_s3(
        s3, s3_shards, tmp_path):
    s3.faults(error_every=3)   # every 3rd shard GET (retries included) answers 500
    train(s3_shards["train"], tmp_path / "run")
    injected = s3.injected()
    s3.faults()

    assert sorted(step_losses(tmp_path / "run")) == list(range(1, STEPS + 1))
    last = [r for r in read_metrics(tmp_path / "run") if "data/samples_read" in r][-1]
    assert last["data/samples_read"] == 128   # summed over the ranks: every sample once
    assert last["data/read_retries"] == injected["error"] >= 2

    local = s3_shards["local"]
    remote = clip_eval(tmp_path / "run", s3_shards["zeroshot"], s3_shards["val"], tmp_path / "s3.json")
    reference = clip_eval(tmp_path / "run", str(local["zeroshot"]), str(local["val"]),
                          tmp_path / "local.json")
    assert remote == reference and remote["retrieval"]["num_images"] == 24
