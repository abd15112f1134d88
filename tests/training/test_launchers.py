"""The trainer under the `deepspeed` launcher gives the same run as under torchrun.

The deepspeed launcher passes `--local_rank=N` and sets RANK/WORLD_SIZE/LOCAL_RANK itself; the
CLI must accept both and the ranks must form the same 2-process job (same per-step losses).
(srun is covered by tests/launch, a plain process by test_trainer.py.)
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.torchrun import REPO_ROOT, run_torchrun, torchrun_env
from tests.helpers.trainer import TINY_CLIP, read_metrics, step_losses, tiny_overrides
from training.distributed import free_port

pytestmark = pytest.mark.slow
STEPS = 4


def test_deepspeed_launcher_run_equals_torchrun_run(tmp_path):
    shards = make_synthetic_shards(tmp_path / "shards", train=128, val=0, zeroshot=0,
                                   samples_per_shard=32)
    args = lambda run_dir: ["--config", TINY_CLIP, *tiny_overrides(shards["train_shards"],
                                                                   run_dir, steps=STEPS)]
    run_torchrun(["-m", "training", *args(tmp_path / "torchrun")], nproc=2)

    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(free_port()), "--module", "training",
                *args(tmp_path / "deepspeed")]
    proc = subprocess.run(launcher, cwd=REPO_ROOT, env=torchrun_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert (tmp_path / "deepspeed" / "done.json").is_file()
    records = [r for r in read_metrics(tmp_path / "deepspeed") if "samples_per_s_per_rank" in r]
    assert records and all(r["samples_per_s"] == pytest.approx(2 * r["samples_per_s_per_rank"])
                           for r in records)  # two ranks in one job, not two jobs of one
    reference, launched = step_losses(tmp_path / "torchrun"), step_losses(tmp_path / "deepspeed")
    assert sorted(launched) == list(range(1, STEPS + 1))
    assert launched == pytest.approx(reference, rel=1e-6)
