"""Feature-cached gradient accumulation stays exact with BatchNorm and dropout (a timm network
with BatchNorm and open_clip's MLP head with dropout 0.2), on 2 ranks with real DeepSpeed engines.

"Exact" (docs/students.md): the gradient and the running statistics equal those of the same
micro-batch partition without caching: one train-mode forward per micro-batch (BatchNorm
normalises per micro-batch), the outputs joined, one full-batch backward; the running
statistics are then averaged over ranks (the trainer does so after every step). One launch
(tests/training/accumulation_bn_worker.py) measures it; each test checks one property."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.torchrun import run_torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("accum-bn")
    shards = make_synthetic_shards(root / "shards", train=64, val=0, zeroshot=0,
                                   samples_per_shard=32)
    out = root / "out"
    out.mkdir()
    run_torchrun(["tests/training/accumulation_bn_worker.py", "--shards",
                  shards["train_shards"], "--out", str(out)], nproc=2, timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_gradient_equals_the_uncached_partition(ranks):
    for rank in ranks:
        result = rank["replayed"]
        assert result["grad_norm"] > 1e-3 and result["tensors"] > 20
        assert result["grad_vs_reference"] < 1e-5, result


def test_running_statistics_are_updated_once_per_micro_batch(ranks):
    for rank in ranks:
        result = rank["replayed"]
        assert result["bn_buffers"] > 20
        assert result["buffers_vs_reference"] == 0.0, result
        assert result["batches_tracked"] == [2]  # two micro-batches, one update each


def test_ranks_keep_the_same_running_statistics(ranks):
    """Each rank normalised its own micro-batches; after the step the statistics are their
    mean over ranks, the same on every rank (evaluation splits a set over ranks)."""
    assert ranks[0]["replayed"]["buffer_checksum"] == ranks[1]["replayed"]["buffer_checksum"]


def test_without_replay_the_check_fails(ranks):
    """Dropout masks of the grad pass differ from the cached ones, and every grad pass updates
    the running statistics again: the measurement can tell."""
    for rank in ranks:
        result = rank["unreplayed"]
        assert result["grad_vs_reference"] > 1e-2, result
        assert result["buffers_vs_reference"] > 0, result
        assert result["batches_tracked"] == [4]


@pytest.mark.parametrize("momentum", [0.1, None])  # an EMA, and a cumulative running mean
def test_averaging_once_before_a_read_equals_averaging_after_every_step(momentum):
    """Why the trainer averages the ranks' running statistics only before an evaluation or a
    checkpoint: the update is linear in the statistics, so the mean of the ranks' own statistics
    after several steps equals statistics averaged after each step."""
    torch.manual_seed(0)
    batches = [[torch.randn(16, 4) * (rank + 1) + step for step in range(3)] for rank in range(2)]
    own = [torch.nn.BatchNorm1d(4, momentum=momentum) for _ in range(2)]
    synced = [torch.nn.BatchNorm1d(4, momentum=momentum) for _ in range(2)]
    for step in range(3):
        for rank in range(2):
            own[rank](batches[rank][step])
            synced[rank](batches[rank][step])
        for name in ("running_mean", "running_var"):
            mean = (getattr(synced[0], name) + getattr(synced[1], name)) / 2
            for module in synced:
                getattr(module, name).copy_(mean)
    for name in ("running_mean", "running_var"):
        once = (getattr(own[0], name) + getattr(own[1], name)) / 2
        assert not torch.allclose(getattr(own[0], name), getattr(own[1], name))  # ranks differ
        torch.testing.assert_close(once, getattr(synced[0], name), rtol=1e-6, atol=1e-6)
