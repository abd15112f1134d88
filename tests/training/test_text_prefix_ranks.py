"""Causal text towers on the batch's used tokens under ZeRO-3 (2 ranks, torchrun, gloo, real
DeepSpeed, feature-cached accumulation): the per-step losses equal the same run on the whole
context, and both the student and the teacher did run on the used tokens (one launch:
tests/training/text_prefix_worker.py)."""
from __future__ import annotations

import json

import pytest

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.torchrun import run_torchrun
from tests.helpers.trainer import step_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("text-prefix")  # shards/, the runs' folders, rank<r>.json
    train = make_synthetic_shards(out / "shards", train=64, val=0, zeroshot=0)["train_shards"]
    run_torchrun(["tests/training/text_prefix_worker.py", "--shards", train, "--out", str(out)],
                 nproc=2, timeout=600)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_zero3_losses_on_the_used_tokens_equal_the_whole_context(launch):
    out, _ = launch
    trimmed, whole = step_losses(out / "used-tokens"), step_losses(out / "whole-context")
    assert sorted(trimmed) == sorted(whole) == [1, 2, 3]
    for step, loss in whole.items():
        assert trimmed[step] == pytest.approx(loss, rel=1e-6, abs=0), step


def test_student_and_teacher_ran_on_the_used_tokens_only_when_on(launch):
    _, ranks = launch
    for runs in ranks:
        assert runs["whole-context"]["prefix_encodes"] == []
        used = runs["used-tokens"]["prefix_encodes"]
        # Per step: the teacher once per micro-batch; the student in the caching pass and the
        # grad pass of each of its 2 micro-batches.
        assert sum(who == "teacher" for *_, who in used) == 3 * 2
        assert sum(who == "student" for *_, who in used) == 3 * 4
        assert all(length < context for context, length, _ in used), used
        # Every one of those lengths came with the batch from the loader.
        assert runs["used-tokens"]["loader_counted"] == [True] * len(used)
