"""The rendered job script run by bash against stand-in SLURM commands (srun, scontrol, scancel
that record their arguments): what it hands to srun."""
import os
import stat
import subprocess

import pytest

from launch.submit import JobSpec, render

STUB = '#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_LOG/$(basename "$0").args"\n' \
       '[ "$(basename "$0")" = scontrol ] && echo n1\nexit 0\n'


def run_script(tmp_path, cpus_per_task: str | None) -> list[str]:
    """The srun arguments of one run of the script (srun does nothing and exits 0)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name in ("srun", "scontrol", "scancel"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(stat.S_IRWXU)
    spec = JobSpec(config="configs/tiny-distill.yaml", run_dir=str(tmp_path / "run"),
                   overrides=["data.train=/d/shard-{000000..000001}.tar",
                             "model.teacher_pretrained=null", "model.student_init=null"])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1"}
    env.pop("SLURM_CPUS_PER_TASK", None)
    if cpus_per_task is not None:
        env["SLURM_CPUS_PER_TASK"] = cpus_per_task
    done = subprocess.run(["bash", "-c", render(spec)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert "run ended without done.json (srun exit 0" in done.stdout, done.stdout + done.stderr
    return (log / "srun.args").read_text().splitlines()


@pytest.mark.parametrize("cpus", ["16", None])
def test_srun_gets_the_jobs_cpus_per_task(tmp_path, cpus):
    """SLURM >= 22.05: srun no longer inherits --cpus-per-task from sbatch, so the script passes it."""
    args = run_script(tmp_path, cpus)
    assert args[:3] == ["--kill-on-bad-exit=1", "--nodes=1", "--ntasks-per-node=1"]
    passed = [a for a in args if a.startswith("--cpus-per-task")]
    assert passed == ([f"--cpus-per-task={cpus}"] if cpus else [])
