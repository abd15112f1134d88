"""The real trainer (python -m training) launched on two nodes: by SLURM (clip-submit, srun,
torchrun c10d), preempted and resumed under SLURM, and by two torchrun agents without SLURM.

One short distillation (Tiny-ViT-Teacher -> Tiny-ViT-Student, 64 px synthetic shards, 2 ranks)
runs uninterrupted under SLURM first; the other two runs must reproduce its loss sequence.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.status import run_status
from tests.helpers.shards import make_synthetic_shards
from tests.helpers.torchrun import CPU_GLOO_ENV, REPO_ROOT

pytestmark = pytest.mark.slow

CONFIG = str(REPO_ROOT / "configs" / "tiny-distill.yaml")
TOTAL_STEPS = 16  # 2 epochs of 256 samples; enough steps left after a signal on a fast machine
CPU_ENV = [arg for key, value in CPU_GLOO_ENV.items() for arg in ("--env", f"{key}={value}")]


def trainer_overrides(train_shards: str) -> list[str]:
    """A short run: random teacher, 16 per rank per step, a metrics line every step."""
    return [f"data.train={train_shards}", "model.teacher_pretrained=null",
            "model.student_init=null", "optim.epochs=null",
            f"optim.total_steps={TOTAL_STEPS}", "optim.warmup_steps=0", "data.batch_size=16",
            "data.workers=0", "log.every_steps=1", "log.tensorboard=false",
            "checkpoint.every_steps=0"]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("shards"), train=256, val=0, zeroshot=0)


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, shards, tmp_path_factory):
    """The uninterrupted 2-node SLURM run: (run_dir, job id, final job info)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job = slurm_cluster.clip_submit(CONFIG, "--run-dir", str(run_dir), "--nodes", "2", *CPU_ENV,
                                    *trainer_overrides(shards["train_shards"]))
    info = slurm_cluster.wait_for_end(job, timeout=300)
    return run_dir, job, info


def test_two_node_slurm_job_distils_to_completion(reference_run):
    run_dir, job, info = reference_run
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", info
    done = json.loads((run_dir / "done.json").read_text())
    assert done["step"] == TOTAL_STEPS
    assert sorted(losses(run_dir)) == list(range(1, TOTAL_STEPS + 1))
    # Both nodes ran a rank: each node's log carries lines of exactly one rank, together 0 and 1.
    ranks = []
    for node in (0, 1):
        text = (run_dir / "logs" / f"job{job}-restart0-node{node}.out").read_text()
        node_ranks = {line.split("]")[0] for line in text.splitlines() if line.startswith("[rank")}
        assert len(node_ranks) == 1, (node, node_ranks)
        ranks += node_ranks
    assert sorted(ranks) == ["[rank0", "[rank1"]
    rank_logs = sorted(p.parent.name for p in (run_dir / "logs" / "ranks").glob("*/attempt_0/*/stderr.log"))
    assert rank_logs == ["0", "0"]  # one local rank 0 per node agent


def test_final_checkpoint_loads_into_open_clip(reference_run):
    """The export loads strictly into open_clip and equals DeepSpeed's own fp32 consolidation."""
    import open_clip
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir, _, _ = reference_run
    open_clip.add_model_config(str(REPO_ROOT / "configs" / "models"))
    model = open_clip.create_model("Tiny-ViT-Student",
                                   pretrained=str(run_dir / "export" / "open_clip_model.safetensors"))
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert tag.endswith(f"{TOTAL_STEPS:08d}")
    task_state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    zero = {k.removeprefix("student."): v for k, v in task_state.items()}  # the task's student
    exported = model.state_dict()
    assert set(exported) <= set(zero)
    for key, value in exported.items():
        torch.testing.assert_close(value.float(), zero[key].float().reshape(value.shape), msg=key)


def test_preempted_slurm_job_resumes_and_continues_the_same_loss_curve(slurm_cluster, shards,
                                                                       reference_run, tmp_path):
    reference = losses(reference_run[0])
    run_dir = tmp_path / "run"
    job = slurm_cluster.clip_submit(CONFIG, "--run-dir", str(run_dir), "--nodes", "2", *CPU_ENV,
                                    *trainer_overrides(shards["train_shards"]))
    slurm_cluster.wait_until(job, lambda _: len(metrics(run_dir)) >= 1, 240, "the first step")
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    slurm_cluster.wait_until(job, lambda i: i.get("Restarts") == "1", 120, "the requeue")
    stopped_at = len(metrics(run_dir))
    assert 1 <= stopped_at < TOTAL_STEPS and not (run_dir / "done.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith(f"{stopped_at:08d}")

    info = slurm_cluster.wait_for_end(job, timeout=300)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # exact: no step lost, none repeated
    resumed = losses(run_dir)
    assert resumed == pytest.approx(reference, rel=1e-4, abs=1e-5)  # the same curve, both sides
    events = [line.split("\t")[3] for line in (run_dir / "logs" / "job-events.tsv").read_text().splitlines()]
    assert events == ["start", "signal", "requeue", "start", "done"]
    for node in (0, 1):  # both nodes ran the rerun, each with one rank
        text = (run_dir / "logs" / f"job{job}-restart1-node{node}.out").read_text()
        assert len({line.split("]")[0] for line in text.splitlines() if line.startswith("[rank")}) == 1
    status = run_status(str(run_dir))
    assert (status["stage"], status["restarts"]) == ("done", 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_without_slurm_match_the_slurm_run(shards, reference_run, tmp_path):
    """`python -m launch.torchrun --nnodes 2` started twice on this host, as two nodes."""
    run_dir = tmp_path / "run"
    port = _free_port()
    node_cmd = [sys.executable, "-m", "launch.torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(port), "--run-id", "two-agents",
                "--", "--config", CONFIG, f"run_dir={run_dir}", *trainer_overrides(shards["train_shards"])]
    env = {**os.environ, **CPU_GLOO_ENV, "PYTHONPATH": str(REPO_ROOT)}
    logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
    agents = [subprocess.Popen(node_cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True) for log in logs]
    try:
        codes = [agent.wait(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, 9)
                agent.wait()
        for log in logs:
            log.close()
    assert codes == [0, 0], [(tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1)]
    assert json.loads((run_dir / "done.json").read_text())["step"] == TOTAL_STEPS
    assert losses(run_dir) == pytest.approx(losses(reference_run[0]), rel=1e-4, abs=1e-5)
