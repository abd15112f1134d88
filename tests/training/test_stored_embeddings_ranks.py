"""Distilling from stored embeddings on 2 ranks (torchrun, gloo, real DeepSpeed) at ZeRO-2 and
ZeRO-3 with gradient accumulation, against one process, and an exact resume.

64 samples (4 shards, set "tiny", 2 stored crops each), a global batch of 16: 4 per micro-batch
x 2 micro-batches x 2 ranks, or 4 x 4 micro-batches in the one process; the epoch's order has 4
lanes in both (order.py), so every step trains on the same samples, crops and captions, and the
per-step losses agree within 1e-5 relative; each stage's run resumed at step 2 repeats steps 3-4
exactly. The 2-rank runs (ZeRO-2, ZeRO-3) share one torchrun launch, their resumes another
(tests/helpers/clip_train_runs.py).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.clip_train_runs import clip_train_runs
from tests.helpers.embeddings import SET_NAME, make_embedding_set
from tests.helpers.torchrun import torchrun_env
from tests.helpers.trainer import REPO_ROOT, TINY_DISTILL, step_losses, tiny_overrides
from training.checkpoint import tag_for_step

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return make_embedding_set(tmp_path_factory.mktemp("stored-ranks"))


def overrides(embedded, run_dir: Path, accum: int, zero: int, *extra: str) -> list[str]:
    return [*tiny_overrides(embedded["train_shards"], run_dir, steps=STEPS, batch_size=4),
            f"model.teacher_pretrained={embedded['teacher']}", "model.teacher_source=shards",
            f"model.teacher_embeddings={SET_NAME}", f"optim.grad_accum_steps={accum}",
            f"deepspeed.zero_stage={zero}", "checkpoint.export_at_end=false", *extra]


def train_one_process(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "training", "--config", TINY_DISTILL, *args],
                            cwd=REPO_ROOT, env=torchrun_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.fixture(scope="module")
def one_process(embedded, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stored-one") / "run"
    train_one_process(overrides(embedded, run_dir, accum=4, zero=0))
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.fixture(scope="module")
def two_ranks(embedded, tmp_path_factory):
    """Two torchrun launches (2 ranks): ZeRO-2 then ZeRO-3; then each resumed from its step-2
    checkpoint in a new run folder, in a fresh launch as a resume after a stop is. Returns the
    root of the run folders."""
    root = tmp_path_factory.mktemp("stored-two")
    every = ["checkpoint.every_steps=2", "checkpoint.keep_last=3"]
    runs = {f"zero{zero}": overrides(embedded, root / f"zero{zero}", 2, zero, *every)
            for zero in (2, 3)}
    resumes = {f"zero{zero}-resumed": overrides(
        embedded, root / f"zero{zero}-resumed", 2, zero,
        f"checkpoint.resume={root / f'zero{zero}' / 'checkpoints' / tag_for_step(2)}")
        for zero in (2, 3)}
    for launch, plan in enumerate((runs, resumes)):
        folder = root / f"launch-{launch}"
        folder.mkdir()
        results = clip_train_runs({name: ["--config", TINY_DISTILL, *args]
                                   for name, args in plan.items()}, folder, nproc=2)
        for name, result in results.items():
            assert result["status"] == 0, (name, result["stdout"][-2000:]
                                           + result["stderr"][-2000:])
    return root


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_equal_one_process_and_resume_exactly(one_process, two_ranks, zero):
    losses = step_losses(two_ranks / f"zero{zero}")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in one_process.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), (zero, step)
    assert step_losses(two_ranks / f"zero{zero}-resumed") == {3: losses[3], 4: losses[4]}
