"""clip-stages: config checks, and the tiny 2-stage chain end to end with a kill and a rerun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import save_file

from tests.helpers.inheritance import model
from tests.helpers.shards import make_synthetic_shards
from training.inheritance.record import file_sha256
from training.inheritance.stages import load_stages, main, training_command

RECIPE = "configs/stages/tiny.yaml"


@pytest.mark.parametrize("recipe", ["configs/stages/tiny.yaml",
                                    "configs/stages/tinyclip-vit-b32-manual.yaml"])
def test_recipes_load(recipe):
    cfg = load_stages(recipe, ["data=/x/{0..1}.tar"])
    assert len(cfg.stages) == 2 and cfg.stages[1].inherit.source == "previous"
    command = training_command(cfg, 1, "/s.safetensors")
    assert "checkpoint.resume=latest" in command and "model.student_init=/s.safetensors" in command
    assert f"model.teacher={cfg.teacher}" in command and f"model.student={cfg.stages[1].student}" in command


@pytest.mark.parametrize("override, message", [
    ([], "key data: required value is missing"),
    (["data=x", "stages.0.inherit.width=magic"], "stages[0].inherit.width"),
    (["data=x", "train_config=/nope.yaml"], "/nope.yaml not found"),
])
def test_bad_stage_config_is_one_line(capsys, override, message):
    assert main(["--config", RECIPE, *override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _driver(root, shards, teacher):
    return [sys.executable, "-m", "training.inheritance.stages", "--config", RECIPE,
            f"run_root={root}", f"data={shards}", f"teacher_pretrained={teacher}"]


@pytest.mark.slow
def test_two_stage_chain_survives_a_kill_and_skips_done_stages(tmp_path):
    shards = make_synthetic_shards(tmp_path / "data", train=64, val=0, zeroshot=0,
                                   samples_per_shard=32)["train_shards"]
    teacher = tmp_path / "teacher.safetensors"
    save_file(model("Tiny-ViT-Teacher", seed=5).state_dict(), str(teacher))
    root = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_driver(root, shards, teacher), stdout=log1, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
    latest = root / "small" / "checkpoints" / "latest"
    deadline = time.time() + 400
    while not latest.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # hard kill, mid stage 2
    first.wait()
    assert latest.exists(), (tmp_path / "first.log").read_text()[-3000:]
    assert (root / "mid" / "done.json").is_file() and not (root / "small" / "done.json").exists()
    mid_done = (root / "mid" / "done.json").stat().st_mtime_ns
    small_init = (root / "small" / "inherit" / "student.safetensors").stat().st_mtime_ns

    second = subprocess.run(_driver(root, shards, teacher), capture_output=True, text=True,
                            env=env, timeout=500)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "stage mid: done, skipped" in out and "up to date" in out
    assert "resumed from" in out  # stage 2 continued from its checkpoint
    assert (root / "mid" / "done.json").stat().st_mtime_ns == mid_done
    assert (root / "small" / "inherit" / "student.safetensors").stat().st_mtime_ns == small_init
    assert json.loads((root / "small" / "done.json").read_text()) is not None
    assert (root / "small" / "export" / "open_clip_model.safetensors").is_file()
    record = json.loads((root / "small" / "inherit" / "inheritance.json").read_text())
    assert record["inputs"]["teacher"]["model"] == f"local-dir:{root / 'mid' / 'export'}"
    assert record["inputs"]["teacher"]["weights_sha256"] == file_sha256(
        root / "mid" / "export" / "open_clip_model.safetensors")

    third = subprocess.run(_driver(root, shards, teacher), capture_output=True, text=True,
                           env=env, timeout=300)
    assert third.returncode == 0 and "stage small: done, skipped" in third.stdout + third.stderr


def test_a_failing_training_stage_is_one_line_and_exit_1(tmp_path, capsys):
    failing = f"launcher=['{sys.executable}','-c','raise SystemExit(3)']"
    assert main(["--config", RECIPE, "data=x", f"run_root={tmp_path}",
                 "stages.0.inherit.source=none", failing]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "clip-stages: error: stage mid: training exited with status 3"
