"""The checkpoint directory's rules without an engine: the `latest` pointer, which tag a resume
picks, rotation, RNG states. (Saving and loading through DeepSpeed engines is exercised under
torchrun by test_resume.py and test_zero_stages.py.)"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from training.checkpoint import (CheckpointManager, read_latest, rng_state, set_rng_state,
                                 tag_for_step, write_latest)


def make_tags(root, steps):
    for step in steps:
        tag = root / "checkpoints" / tag_for_step(step)
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_latest_is_replaced_atomically(tmp_path, monkeypatch):
    make_tags(tmp_path, [2, 4])
    checkpoints = str(tmp_path / "checkpoints")
    write_latest(checkpoints, "step-00000002")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    write_latest(checkpoints, "step-00000004")
    assert replaced and replaced[0][1].endswith("/latest") and replaced[0][0] != replaced[0][1]
    assert read_latest(checkpoints) == "step-00000004"
    assert not [p for p in os.listdir(checkpoints) if ".tmp" in p]


def test_resume_latest_ignores_a_newer_partial_checkpoint(tmp_path):
    make_tags(tmp_path, [2, 4, 6])  # step 6: killed mid-save, latest never moved
    manager = CheckpointManager(str(tmp_path), keep_last=2, rank=0)
    write_latest(manager.dir, "step-00000004")
    assert manager.resolve("latest") == os.path.join(manager.dir, "step-00000004")


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2, rank=0)
    assert manager.resolve("latest") is None
    make_tags(tmp_path, [2])  # a partial first save: still nothing to resume from
    assert manager.resolve("latest") is None
    assert manager.resolve(None) is None
    assert manager.resolve(str(tmp_path / "checkpoints" / "step-00000002")).endswith("step-00000002")


def test_dangling_latest_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    write_latest(str(tmp_path / "checkpoints"), "step-00000008")
    with pytest.raises(FileNotFoundError, match="step-00000008"):
        read_latest(str(tmp_path / "checkpoints"))


def test_rotation_keeps_the_newest_and_drops_stale_partials(tmp_path):
    make_tags(tmp_path, [2, 4, 6, 8, 12])  # 12: a partial from a run killed before resuming at 6
    manager = CheckpointManager(str(tmp_path), keep_last=2, rank=0)
    (tmp_path / "checkpoints" / "unrelated").mkdir()
    manager._rotate(newest="step-00000008")
    assert sorted(os.listdir(manager.dir)) == ["step-00000006", "step-00000008", "unrelated"]


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
