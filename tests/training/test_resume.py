"""Exact resume and preemption under torchrun (2 ranks, gloo, CPU), through the real CLI.

A: an uninterrupted run of 10 steps (two epochs of 6 steps: the resume crosses an epoch).
B: the same run SIGKILLed as soon as its first checkpoint is complete; a fake partial checkpoint
   newer than `latest` is then planted (what a kill during a save leaves).
C: `checkpoint.resume=latest`; SIGUSR1 to ONE rank mid-way -> all ranks checkpoint, exit 0,
   no done.json.
D: resume again -> finishes, done.json.
The per-step losses of B+C+D equal A's, and the partial checkpoint was ignored and cleaned up.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.torchrun import (REPO_ROOT, kill_process_tree, run_torchrun, torchrun_command,
                                   torchrun_env)
from tests.helpers.trainer import TINY_DISTILL, read_metrics, step_losses, tiny_overrides

pytestmark = pytest.mark.slow
STEPS = 10


def overrides(shards: dict, run_dir: Path) -> list[str]:
    return tiny_overrides(shards["train_shards"], run_dir, steps=STEPS) + [
        "data.workers=1", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
        "checkpoint.resume=latest", "checkpoint.export_at_end=false", "optim.warmup_steps=3"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(["-m", "training", *args], nproc=2),
                            cwd=REPO_ROOT, env=torchrun_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) first:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            kill_run(proc)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def worker_pids(agent_pid: int) -> list[int]:
    """The ranks: the `-m training` processes torchrun's agent starts as its direct children."""
    return sorted(child.pid for child in psutil.Process(agent_pid).children()
                  if "training" in child.cmdline())


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the agent and its ranks (torchrun puts each rank in its own session)."""
    kill_process_tree(proc.pid)
    proc.wait()


def latest(run_dir: Path) -> str | None:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    shards = make_synthetic_shards(root / "shards", train=96, val=0, zeroshot=0,
                                   samples_per_shard=16)
    reference, interrupted = root / "reference", root / "interrupted"
    config = ["--config", TINY_DISTILL]

    run_torchrun(["-m", "training", *config, *overrides(shards, reference)], nproc=2,
                 timeout=600)

    proc = start([*config, *overrides(shards, interrupted)])  # B: SIGKILL after a checkpoint
    wait_for(lambda: latest(interrupted) is not None, proc)
    kill_run(proc)
    killed_at = latest(interrupted)
    partial = interrupted / "checkpoints" / "step-00000009"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a checkpoint")

    proc = start([*config, *overrides(shards, interrupted)])  # C: resume, then preempt
    resumed_from, seen = int(killed_at.split("-")[1]), len(read_metrics(interrupted))
    wait_for(lambda: any(r["step"] > resumed_from for r in read_metrics(interrupted)[seen:]
                         if "loss" in r), proc)
    assert len(worker_pids(proc.pid)) == 2
    os.kill(worker_pids(proc.pid)[-1], signal.SIGUSR1)
    preempted_output, _ = proc.communicate(timeout=300)
    preempted = {"rc": proc.returncode, "done": (interrupted / "done.json").exists(),
                 "latest": latest(interrupted), "output": preempted_output}

    run_torchrun(["-m", "training", *config, *overrides(shards, interrupted)], nproc=2,
                 timeout=600)  # D: finish
    return {"reference": reference, "interrupted": interrupted, "killed_at": killed_at,
            "preempted": preempted, "partial": partial}


def test_killed_preempted_and_resumed_run_matches_uninterrupted_losses(runs):
    reference = step_losses(runs["reference"])
    resumed = step_losses(runs["interrupted"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    for key in ("lr", "epoch"):
        assert step_losses(runs["interrupted"], key) == step_losses(runs["reference"], key)


def test_kill_happened_mid_run(runs):
    assert runs["killed_at"] != f"step-{STEPS:08d}"


def test_preemption_checkpoints_and_exits_zero_without_done(runs):
    preempted = runs["preempted"]
    assert preempted["rc"] == 0, preempted["output"][-3000:]
    assert not preempted["done"]
    assert preempted["latest"] not in (None, runs["killed_at"])
    assert "preempted at step" in preempted["output"]


def test_partial_checkpoint_ignored_and_rotated_away(runs):
    checkpoints = runs["interrupted"] / "checkpoints"
    assert not runs["partial"].exists()
    assert latest(runs["interrupted"]) == f"step-{STEPS:08d}"
    tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert len(tags) == 2 and tags[-1] == f"step-{STEPS:08d}"  # keep_last=2
    done = json.loads((runs["interrupted"] / "done.json").read_text())
    assert done["step"] == STEPS and done["samples_seen"] == STEPS * 16
