"""Resuming under changed settings, through the real CLI: what cannot continue exactly (a ZeRO
stage, a batch size or a world size that cannot keep the global batch, a model) is ONE line on
stderr and exit 2 before anything is built; a raised total_steps continues with this run's
schedule (no zero-lr step).

One 2-step ZeRO-1 run (the review's case: resuming it at ZeRO-0 used to end in DeepSpeed's
AttributeError, at ZeRO-3 in an AssertionError, on 2 ranks in a ZeRORuntimeException). That
run and the refused single-process resumes run through training.cli.main, one after another in
one worker process (tests/helpers/clip_train_runs.py: the imports are paid once)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tests.helpers.clip_train_runs import clip_train_runs
from tests.helpers.shards import make_synthetic_shards
from tests.helpers.torchrun import REPO_ROOT, run_torchrun
from tests.helpers.trainer import TINY_DISTILL, read_metrics, tiny_overrides
from training.optim import warmup_cosine_factor

pytestmark = pytest.mark.slow
LR = 5e-4  # tiny_overrides' optim.lr


def clip_train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


CHANGES = {  # the changed setting: how the refusal names the run's own
    "deepspeed.zero_stage=0": "deepspeed.zero_stage=1",
    "deepspeed.zero_stage=3": "deepspeed.zero_stage=1",
    "data.batch_size=16": "data.batch_size=8",
    "model.student=Inherit-Tiny-ViT-Shallow": "model.student='Tiny-ViT-Student'",
}
SHORTER = "optim.total_steps=1"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The finished 2-step run, then `python -m training` resuming it with each changed setting
    and with a shorter total_steps (last: it fails after the process group is up), in one
    worker: (run_dir, its args, {override: {"status", "stdout", "stderr"}})."""
    root = tmp_path_factory.mktemp("resume-changes")
    shards = make_synthetic_shards(root / "shards", train=64, val=0, zeroshot=0,
                                   samples_per_shard=32)
    run_dir = root / "run"
    args = ["--config", TINY_DISTILL, *tiny_overrides(shards["train_shards"], run_dir, steps=2),
            "deepspeed.zero_stage=1", "checkpoint.resume=latest", "checkpoint.export_at_end=false"]
    plan = {"finished": args,
            **{change: [*args, "optim.total_steps=4", change] for change in CHANGES},
            SHORTER: [*args, SHORTER]}
    results = clip_train_runs(plan, root)
    finished = results.pop("finished")
    assert finished["status"] == 0, finished["stdout"][-3000:] + finished["stderr"][-3000:]
    return run_dir, args, results


@pytest.fixture(scope="module")
def finished_run(runs):
    return runs[:2]


@pytest.fixture(scope="module")
def refused(runs):
    return runs[2]


@pytest.mark.parametrize("change", CHANGES)
def test_changed_setting_is_one_line_exit_2(finished_run, refused, change):
    run_dir, _ = finished_run
    result, named = refused[change], CHANGES[change]
    assert result["status"] == 2, result["stdout"][-2000:] + result["stderr"][-2000:]
    assert "Traceback" not in result["stderr"] + result["stdout"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip-train: error: checkpoint.resume:")
    assert named in lines[0] and f"set {named.split('=')[0]}=" in lines[0]
    assert max(r["step"] for r in read_metrics(run_dir) if "loss" in r) == 2  # nothing trained


def test_world_size_that_cannot_keep_the_global_batch_is_one_line_exit_2(finished_run):
    """8 samples per step on 1 rank; 2 ranks of data.batch_size=8 would make 16 (2 ranks of 4
    continue it: tests/training/test_resume_world_size.py)."""
    run_dir, args = finished_run
    result = run_torchrun(["-m", "training", *args,
                           "optim.total_steps=4"], nproc=2, check=False, timeout=300)
    assert result.returncode != 0  # torchrun's agent reports the ranks' exit 2 (its own trace)
    assert "training/" not in "".join(l for l in result.stdout.splitlines() if 'File "' in l)
    assert "ZeRORuntimeException" not in result.stdout
    errors = [line for line in result.stdout.splitlines() if "clip-train: error:" in line]
    assert errors and all("4 per rank on 2 ranks, which data.batch_size=8 does not divide; set "
                          "data.batch_size=4" in line for line in errors)


def test_shorter_total_steps_is_refused(refused):
    result = refused[SHORTER]
    assert result["status"] == 2 and "optim.total_steps: this run has 1 steps" in result["stderr"]


def test_raised_total_steps_continues_the_schedule_without_a_zero_lr_step(finished_run):
    run_dir, args = finished_run  # runs last in this module: it extends the run
    first = {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r}
    assert first[1] == pytest.approx(LR) and first[2] == pytest.approx(LR * 0.5)  # cosine over 2
    result = clip_train(args + ["optim.total_steps=4"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r}
    for step in (3, 4):  # step s uses the new schedule's rate at s - 1 (no stale 0 from the old)
        expected = LR * warmup_cosine_factor(step - 1, warmup_steps=0, total_steps=4, min_ratio=0)
        assert resumed[step] == pytest.approx(expected, rel=1e-9) and resumed[step] > 0
    assert resumed[3] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi / 2)))
