"""A disk that fills up while a checkpoint is written, and a read-only one (issue 14): one line
that says "disk", the half-written tag gone, `latest` still on the previous good checkpoint. The
disks are real tmpfs mounts (1 MiB; read-only), skipped without the right to mount; the engine is
a stand-in writing its file with torch.save as DeepSpeed does."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointManager, CheckpointSaveError
from training.checkpoint_files import read_latest
from training.run_lock import RunLock


class FileEngine:
    """save_checkpoint as DeepSpeed lays it out: SAVE_DIR/TAG/mp_rank_00_model_states.pt."""

    def __init__(self, floats: int):
        self.floats = floats

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"module": {"w": torch.zeros(self.floats)}, **client_state},
                   os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("no right to mount a small tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_good_checkpoint(small_disk):
    manager = CheckpointManager(str(small_disk / "run"), keep_last=2, rank=0)
    os.makedirs(manager.dir)
    manager.save(FileEngine(1000), {}, {"step": 2})  # 4 KB: fits
    with pytest.raises(CheckpointSaveError) as err:
        manager.save(FileEngine(1_000_000), {}, {"step": 4})  # 4 MB: does not
    message = str(err.value)
    assert "\n" not in message and "the disk is full" in message
    assert "step-00000004" in message and "the last good checkpoint is step-00000002" in message
    assert read_latest(manager.dir) == "step-00000002"
    assert sorted(p.name for p in Path(manager.dir).iterdir() if p.is_dir()) == ["step-00000002"]


def test_a_read_only_run_dir_is_one_line_before_anything_is_built(tmp_path):
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("no right to mount a read-only tmpfs here")
    try:
        with pytest.raises(ValueError) as err:
            RunLock(str(disk / "run")).acquire()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    assert str(err.value) == f"run_dir {disk / 'run'}: cannot be created (Read-only file system)"
