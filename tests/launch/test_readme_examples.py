"""The README's own `clip-submit` example, run as written (with --dry-run, which it carries) in a
folder holding the files it names: it must render a job script, not fail on its own values."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import braceexpand
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]


def readme_command(program: str) -> list[str]:
    """The first command in README.md starting with `program`, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^{program} (?:.*\\\n)*.*$", text, flags=re.M)
    assert match, f"no {program} example in README.md"
    command = match.group(0).replace("\\\n", " ")
    return shlex.split(command, comments=True)


def test_readme_clip_submit_example_renders_a_job_script(tmp_path):
    args = readme_command("clip-submit")[1:]
    assert "--dry-run" in args
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    overrides = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    for path in braceexpand.braceexpand(overrides["data.train"]):  # the files a user has by now
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    for key in ("model.student_init", "model.teacher_pretrained"):  # weights files (checked)
        (tmp_path / overrides[key]).parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(1)}, str(tmp_path / overrides[key]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "launch.submit", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!/bin/bash\n") and "#SBATCH --nodes=4\n" in done.stdout
    assert f"data.train={overrides['data.train']}" in done.stdout.replace("'", "")
