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
def test_preempted_job_checkpoints_requeues_resumes_and_finishes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    total = 16
    job = submit_contract(slurm_cluster, run_dir, f"total_steps={total}", "step_s=0.3")
    slurm_cluster.wait_until(job, lambda _: len(metric_steps(run_dir)) >= 4, 120, "4 steps")
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])  # the preemption warning
    requeued = slurm_cluster.wait_until(job, lambda i: i.get("Restarts") == "1", 60, "the requeue")
    assert not (run_dir / "done.json").exists()
    stopped_at = len(metric_steps(run_dir))
    assert 4 <= stopped_at < total
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    assert requeued["JobState"] in ("PENDING", "REQUEUED", "RUNNING", "CONFIGURING")

    info = slurm_cluster.wait_for_end(job, timeout=180)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1"
    assert metric_steps(run_dir) == list(range(1, total + 1))  # no step lost, none repeated
    assert events(run_dir) == ["start", "signal", "requeue", "start", "done"]
    logs = run_dir / "logs"
    # Each node's log of the rerun shows one rank (the rendezvous deals them out) resuming where
    # the checkpoint left off.
    ranks = []
    for node in (0, 1):
        text = (logs / f"job{job}-restart1-node{node}.out").read_text()
        ranks += {line.split("]")[0] for line in text.splitlines() if line.startswith("[rank")}
        assert f" node {node} starts at step {stopped_at}\n" in text
    assert sorted(ranks) == ["[rank0", "[rank1"]  # one rank per node
    status = run_status(str(run_dir))
    assert (status["stage"], status["restarts"], status["checkpoint"]["tag"]) == ("done", 1, f"step_{total:08d}")


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
