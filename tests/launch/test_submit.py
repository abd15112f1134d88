"""`clip-submit --dry-run`: rendered job scripts for several option sets, and bad options.

The bad options and `python -m launch.submit` itself run as subprocesses (their stderr is the
whole message); the rendered scripts come from the same entry point, main(), in this process
(a fresh process would pay ~6 s of the config check's imports for each)."""
import io
import re
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

from launch.submit import JobSpec, main, parse_time, render

CONFIG = "configs/tiny-distill.yaml"
DATA = "data.train=/data/train/shard-{000000..000009}.tar"
NO_TEACHER_FILE = "model.teacher_pretrained=null"  # the recipe's teacher file need not exist here
NO_INIT = "model.student_init=null"  # the recipe's `teacher` init needs that file


def clip_submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.submit", *args], capture_output=True, text=True)


def dry_run(*args: str) -> str:
    """The job script `clip-submit ARGS --dry-run` prints (exit status 0 asserted)."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*args, "--dry-run"]) == 0
    return out.getvalue()


def directives(script: str) -> list[str]:
    return re.findall(r"^#SBATCH (\S+)$", script, flags=re.M)


OPTION_SETS = {
    "cpu-one-node": ([], {"--nodes=1", "--ntasks-per-node=1", "--requeue", "--signal=B:USR1@120"}),
    "gpu-multi-node": (["--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "64", "--mem", "400G",
                        "--time", "2-00:00:00", "--partition", "gpu", "--account", "proj1", "--qos", "high",
                        "--constraint", "a100&ib", "--exclusive", "--signal-lead", "300"],
                       {"--nodes=4", "--gpus-per-node=8", "--cpus-per-task=64", "--mem=400G",
                        "--time=2-00:00:00", "--partition=gpu", "--account=proj1", "--qos=high",
                        "--constraint=a100&ib", "--exclusive", "--signal=B:USR1@300"}),
    "node-range": (["--nodes", "2", "--min-nodes", "1"], {"--nodes=1-2"}),  # requeue on 1 or 2
    "extra-directives-and-env": (["--directive=--mail-type=END", "--directive=--hint=nomultithread",
                                  "--env", "NCCL_IB_DISABLE=1", "--env", "NOTE=it's a 'quoted' value",
                                  "--job-name", "exp.1", "--time", "90", "--max-restarts", "0"],
                                 {"--mail-type=END", "--hint=nomultithread", "--job-name=exp.1", "--time=90"}),
}


@pytest.mark.parametrize("name", OPTION_SETS)
def test_dry_run_renders_a_script_bash_accepts(name, tmp_path):
    options, expected = OPTION_SETS[name]
    script = dry_run(CONFIG, "--run-dir", str(tmp_path / "run dir"), *options, DATA,
                     NO_TEACHER_FILE, NO_INIT, "optim.lr=3e-4")
    assert script.startswith("#!/bin/bash\n")
    assert expected <= set(directives(script))
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # The overrides reach the trainer, quoted; nothing is written by a dry run.
    assert ("TRAINER_ARGS=('data.train=/data/train/shard-{000000..000009}.tar' "
            "model.teacher_pretrained=null model.student_init=null optim.lr=3e-4 )") in script
    assert not (tmp_path / "run dir").exists()
    if "--job-name" not in options:
        assert "--job-name=run_dir" in directives(script)  # from the run directory, made safe


def test_rendered_values_survive_bash_quoting(tmp_path):
    """Source the variable block of the script in bash and read the values back."""
    spec = JobSpec(config=CONFIG, run_dir=str(tmp_path / "a run"), overrides=[DATA, NO_TEACHER_FILE, NO_INIT, "seed=3"],
                   env=["NOTE=it's $HOME `x`"], nodes=2, gpus_per_node=4)
    script = render(spec)
    block = script[script.index("RUN_DIR="):script.index("\ncd ")]
    probe = block + '\nprintf "%s\\n" "$RUN_DIR" "$NPROC_PER_NODE" "$NOTE" "${TRAINER_ARGS[@]}"'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str(tmp_path / "a run"), "4", "it's $HOME `x`", DATA, NO_TEACHER_FILE, NO_INIT, "seed=3"]


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes 0: must be >= 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node -1: must be >= 0"),
    (["--time", "1:2:3:4"], "--time '1:2:3:4': not a SLURM time"),
    (["--time", "2", "--signal-lead", "120"], "--signal-lead 120: must be shorter than --time 2 (120 s)"),
    (["--mem", "lots"], "--mem 'lots': expected a number"),
    (["--partition", "gpu; rm -rf /"], "--partition 'gpu; rm -rf /': invalid characters"),
    (["--directive=--nodes=3"], "--directive '--nodes=3': set --nodes with its own option"),
    (["--directive=mail-type=END"], "--directive 'mail-type=END': expected --option"),
    (["--env", "1X=2"], "--env '1X=2': expected NAME=VALUE"),
    (["--max-restarts", "-1"], "--max-restarts -1: must be >= 0"),
    (["--nodes", "2", "--min-nodes", "3"], "--min-nodes 3: must be between 1 and --nodes 2"),
    (["--resend-every", "0"], "--resend-every 0: must be >= 1 second"),
    (["optim.lrr=3"], "key optim.lrr"),
    (["deepspeed.precision=fp16"], "fp16 needs a GPU"),
    (["--script", "missing.py"], "--script missing.py: file not found"),
])
def test_bad_options_are_one_line_errors(args, message, tmp_path):
    result = clip_submit(CONFIG, "--run-dir", str(tmp_path / "r"), DATA, NO_TEACHER_FILE, NO_INIT, *args,
                         "--dry-run")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip-submit: error: ") and message in lines[0], lines


def test_bad_config_files_are_one_line_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: {train: a{b}\n")
    for config, message in ((str(tmp_path / "nope.yaml"), "config file not found"),
                            (str(broken), "not valid YAML")):
        result = clip_submit(config, "--run-dir", str(tmp_path / "r"), "--dry-run")
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_gpu_nodes_get_the_fp16_config_accepted_and_ranks_per_gpu(tmp_path):
    spec = JobSpec(config=CONFIG, run_dir=str(tmp_path), overrides=[DATA, NO_TEACHER_FILE, NO_INIT, "deepspeed.precision=fp16"],
                   gpus_per_node=8)
    assert "NPROC_PER_NODE=8\n" in render(spec)


def test_submit_without_sbatch_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.submit", CONFIG, "--run-dir", str(tmp_path / "r"),
                             DATA, NO_TEACHER_FILE, NO_INIT], capture_output=True, text=True, env={"PATH": "/nonexistent"})
    assert result.returncode == 2 and "sbatch not found on PATH" in result.stderr


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("1:30", 90), ("2:00:00", 7200),
                                           ("1-0", 86400), ("1-2:3", 93780), ("1-0:0:5", 86405),
                                           ("UNLIMITED", None)])
def test_slurm_time_formats(text, seconds):
    assert parse_time(text) == seconds
