"""Checkpoints that cannot run code, are verified by their manifest, fall back to the newest good
one, rotate without losing it, and a run folder that one trainer at a time uses (issue 14).

Tag folders here are built by hand (the files a save writes: run.json, DeepSpeed's .pt files, the
manifest); the real save/resume through DeepSpeed engines is in tests/training/test_resume*.py.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.helpers.trainer import REPO_ROOT, TINY_DISTILL
from training.checkpoint import CheckpointManager, resolve_resume, tag_for_step
from training.checkpoint_files import (MANIFEST, check_loadable, find_tag_dir, manifest_of,
                                       read_latest, verify_tag)
from training.files import write_json_atomic
from training.run_lock import LOCK, RunLock


class Evil:
    """Unpickling it creates a folder: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def make_tag(checkpoints, step, module_state=None, complete=True):
    """A ZeRO-0 tag folder as a save leaves it (complete: with its manifest)."""
    tag = checkpoints / tag_for_step(step)
    tag.mkdir(parents=True)
    torch.save({"module": module_state or {"w": torch.full((2,), float(step))}},
               tag / "mp_rank_00_model_states.pt")
    write_json_atomic(tag / "run.json", {"format": 3, "step": step, "zero_stage": 0})
    if complete:
        write_json_atomic(tag / MANIFEST, manifest_of(tag))
    return tag


@pytest.fixture
def evil_run(tmp_path):
    """A run folder whose newest checkpoint's model file holds a code-running pickle, with a
    manifest that matches it (whoever can write the folder can write the manifest too)."""
    marker = tmp_path / "code-ran"
    checkpoints = tmp_path / "run" / "checkpoints"
    tag = make_tag(checkpoints, 4, module_state={"w": Evil(marker)})
    (checkpoints / "latest").write_text(tag.name + "\n")
    return {"run": tmp_path / "run", "tag": tag, "marker": marker,
            "file": tag / "mp_rank_00_model_states.pt"}


def one_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    return lines[0]


def test_a_code_running_file_is_refused_in_one_line_naming_it(evil_run):
    with pytest.raises(ValueError) as err:
        check_loadable(evil_run["file"])
    message = str(err.value)
    assert "\n" not in message and str(evil_run["file"]) in message and "posix.mkdir" in message
    assert not evil_run["marker"].exists()


@pytest.mark.parametrize("command", [
    ["-m", "training", "--export", "{run}"],
    ["-m", "training.evaluation", "eval", "--checkpoint", "{run}", "--cost"],
])
def test_export_and_eval_refuse_it_without_running_it(evil_run, command):
    args = [part.format(run=evil_run["run"]) for part in command]
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    line = one_line(result)
    assert str(evil_run["file"]) in line and "refused" in line
    assert not evil_run["marker"].exists()


def test_resume_refuses_it_and_falls_back_to_the_previous_good_checkpoint(evil_run, caplog):
    checkpoints = evil_run["run"] / "checkpoints"
    with pytest.raises(ValueError, match="refused"):
        resolve_resume(str(evil_run["run"]), str(evil_run["tag"]))  # asked for by path
    make_tag(checkpoints, 2)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(str(evil_run["run"]), "latest") == str(checkpoints / "step-00000002")
    assert "resuming from step-00000002" in caplog.text and "refused" in caplog.text
    assert not evil_run["marker"].exists()


@pytest.mark.parametrize("latest, damage", [
    ("", None), (".", None), ("step-00000009", None), (None, None),
    (b"\xff\xfe", None), ("step-00000004", "flip"), ("step-00000004", "truncate"),
    ("step-00000004", "extra"), ("step-00000004", "no-manifest"),
])
def test_a_bad_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog, latest,
                                                                    damage):
    checkpoints = tmp_path / "checkpoints"
    make_tag(checkpoints, 2)
    newest = make_tag(checkpoints, 4)
    make_tag(checkpoints, 6, complete=False)  # a save killed midway
    model = newest / "mp_rank_00_model_states.pt"
    if damage == "flip":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "truncate":
        model.write_bytes(model.read_bytes()[:100])
    elif damage == "extra":
        (newest / "zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(b"x")
    elif damage == "no-manifest":
        (newest / MANIFEST).unlink()
    if isinstance(latest, bytes):
        (checkpoints / "latest").write_bytes(latest)
    elif latest is not None:
        (checkpoints / "latest").write_text(latest)
    expected = "step-00000002" if damage else "step-00000004"
    with caplog.at_level(logging.WARNING):
        assert read_latest(checkpoints) == expected
    assert f"resuming from {expected}, the newest complete checkpoint" in caplog.text


def test_checkpoints_that_all_fail_are_an_error_not_a_restart_from_step_0(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 4):
        (make_tag(checkpoints, step) / "run.json").write_text("{}")  # not what the manifest says
    (checkpoints / "latest").write_text("")
    with pytest.raises(ValueError) as err:
        read_latest(checkpoints)
    assert "\n" not in str(err.value) and "refusing to restart from step 0" in str(err.value)
    with pytest.raises(ValueError, match="refusing to restart from step 0"):
        find_tag_dir(tmp_path)


def test_only_partial_tags_mean_no_checkpoint_yet(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    make_tag(checkpoints, 2, complete=False)  # killed during the very first save
    assert read_latest(checkpoints) is None
    assert resolve_resume(str(tmp_path), "latest") is None


def test_rotation_keeps_the_newest_good_checkpoint_and_counts_only_complete_ones(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    make_tag(checkpoints, 2)
    make_tag(checkpoints, 4)
    make_tag(checkpoints, 5, complete=False)
    make_tag(checkpoints, 6)
    CheckpointManager(str(tmp_path), keep_last=2, rank=0)._rotate(newest="step-00000006")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004", "step-00000006"]
    CheckpointManager(str(tmp_path), keep_last=1, rank=0)._rotate(newest="step-00000006")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000006"]
    verify_tag(checkpoints / "step-00000006")


def test_a_second_trainer_gets_one_line_naming_the_running_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "111")
        first = RunLock(str(run_dir))
        first.me["pid"] = holder.pid  # the running trainer
        first.acquire()
        RunLock(str(run_dir)).acquire()  # another rank of the same job passes
        monkeypatch.setenv("SLURM_JOB_ID", "222")
        with pytest.raises(ValueError) as err:
            RunLock(str(run_dir)).acquire()
        message = str(err.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and "slurm:111" in message
    finally:
        holder.kill()
        holder.wait()
    second = RunLock(str(run_dir))
    second.acquire()  # the holder is gone: a stale lock is taken over
    assert json.loads((run_dir / LOCK).read_text())["token"] == "slurm:222"
    second.release()
    assert not (run_dir / LOCK).exists()


def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"run_dir .*file/run: cannot be created \(Not a "
                                         r"directory\)"):
        RunLock(str(tmp_path / "file" / "run")).acquire()


def test_clip_train_on_a_run_dir_in_use_is_one_line_exit_2(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / LOCK).write_text(json.dumps({"token": "slurm:999", "pid": holder.pid,
                                                "host": socket.gethostname(), "started": "x"}))
        result = subprocess.run(
            [sys.executable, "-m", "training", "--config", TINY_DISTILL, "data.train=x.tar",
             f"run_dir={run_dir}", "model.teacher_pretrained=null", "model.student_init=null"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "SLURM_JOB_ID": "1000"})
    finally:
        holder.kill()
        holder.wait()
    line = one_line(result)
    assert "another trainer runs in it (job slurm:999, pid" in line and str(run_dir) in line
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]  # nothing else written
