"""The job script on a real 2-node SLURM cluster, driven by a small program that honours the
trainer's launch contract (tests/launch/contract_trainer.py): preemption -> checkpoint, requeue,
resume, finish; a crashed rank -> the whole job fails at once."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from launch.status import run_status

HERE = Path(__file__).parent
CONTRACT = str(HERE / "contract_trainer.py")
CPU_ENV = ["--env", "CUDA_VISIBLE_DEVICES=", "--env", "DS_ACCELERATOR=cpu"]


def submit_contract(cluster, run_dir: Path, *args: str) -> str:
    config = run_dir.parent / "contract.yaml"
    config.write_text("# the contract program reads its settings from key=value overrides\n")
    return cluster.clip_submit(str(config), "--run-dir", str(run_dir), "--nodes", "2",
                               "--script", CONTRACT, *CPU_ENV, *args)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def events(run_dir: Path) -> list[str]:
    return [line.split("\t")[3] for line in (run_dir / "logs" / "job-events.tsv").read_text().splitlines()]


def test_a_job_runs_one_task_on_each_node(slurm_cluster, tmp_path):
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
                      f"#SBATCH --output={tmp_path}/out-%j.txt\n"
                      "srun bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME\"'\n")
    job = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait_for_end(job, timeout=60)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]"
    lines = sorted((tmp_path / f"out-{job}.txt").read_text().split("\n"))
    assert [line for line in lines if line] == ["task 0 on n1", "task 1 on n2"]


@pytest.mark.slow
def test_a_signal_during_start_up_is_repeated_and_restarts_are_bounded(slurm_cluster, tmp_path):
    """USR1 as soon as the job runs: ranks still importing torch ignore it, so the job repeats it
    every 2 s until the ranks act on it (checkpoint, exit 0). With --max-restarts 0 the job is
    not requeued: it ends FAILED, resumable from its checkpoint."""
    run_dir = tmp_path / "run"
    job = submit_contract(slurm_cluster, run_dir, "--max-restarts", "0", "--resend-every", "2",
                          "total_steps=1000", "step_s=0.2")
    slurm_cluster.wait_until(job, lambda i: i.get("JobState") == "RUNNING", 60, "RUNNING")
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    info = slurm_cluster.wait_for_end(job, timeout=120)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    steps = metric_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) < 1000
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{len(steps):08d}"
    assert events(run_dir) == ["start", "signal", "failed"] and not (run_dir / "done.json").exists()
    for node in (0, 1):  # both ranks stopped on the signal, neither crashed
        assert "after a signal" in (run_dir / "logs" / f"job{job}-restart0-node{node}.out").read_text()
    assert run_status(str(run_dir))["stage"] == "failed"


@pytest.mark.slow
def test_a_crashed_rank_fails_the_whole_job_fast(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    # The ranks' gloo timeout is 120 s: a job that waits for it would take minutes.
    job = submit_contract(slurm_cluster, run_dir, "total_steps=1000", "step_s=0.2")
    slurm_cluster.wait_until(job, lambda _: len(metric_steps(run_dir)) >= 3, 120, "3 steps")
    pids = slurm_cluster.rank_pids(job, rank=1)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    info = slurm_cluster.wait_for_end(job, timeout=100)
    ended_after = time.monotonic() - killed
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    assert ended_after < 60, f"the job took {ended_after:.0f} s to notice the lost rank"
    assert slurm_cluster.rank_pids(job, rank=0) == []  # nothing left running
    assert events(run_dir) == ["start", "failed"] and not (run_dir / "done.json").exists()
    assert run_status(str(run_dir))["stage"] == "failed"


@pytest.mark.slow
def test_scancel_checkpoints_and_does_not_requeue(slurm_cluster, tmp_path):
    """A plain `scancel` (SIGTERM to every process of the job): the ranks finish their step and
    checkpoint within KillWait, and the job stays cancelled."""
    run_dir = tmp_path / "run"
    job = submit_contract(slurm_cluster, run_dir, "total_steps=1000", "step_s=0.2")
    slurm_cluster.wait_until(job, lambda _: len(metric_steps(run_dir)) >= 3, 120, "3 steps")
    slurm_cluster.run(["scancel", job])
    info = slurm_cluster.wait_for_end(job, timeout=60)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    slurm_cluster.wait_until(job, lambda _: (run_dir / "checkpoints" / "latest").exists(), 30,
                             "the checkpoint")
    steps = metric_steps(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{len(steps):08d}"
    assert steps == list(range(1, len(steps) + 1)) and not (run_dir / "done.json").exists()
    time.sleep(2)  # the job stays cancelled: no requeue comes
    assert slurm_cluster.job(job)["JobState"] == "CANCELLED"
