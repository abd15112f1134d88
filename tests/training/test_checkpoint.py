"""The checkpoint directory's rules without an engine: the `latest` pointer, which tag a resume
picks, rotation, RNG states. (Saving and loading through DeepSpeed engines is exercised under
torchrun by test_resume.py and test_zero_stages.py.)"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from training.checkpoint import (CheckpointManager, check_resume, check_total_steps,
                                 read_latest, resolve_resume, resume_accumulation, rng_state,
                                 set_rng_state, tag_for_step, write_latest)
from training.checkpoint_files import FORMAT_VERSION, MANIFEST, manifest_of
from training.config import ConfigError, DataConfig, ModelConfig, TrainConfig, to_dict
from training.files import write_json_atomic


def make_tags(root, steps, partial=()):
    """Tag folders with a model file; complete (with a manifest) unless their step is in
    `partial` (a save killed midway)."""
    for step in steps:
        tag = root / "checkpoints" / tag_for_step(step)
        tag.mkdir(parents=True)
        torch.save({"module": {}}, tag / "mp_rank_00_model_states.pt")
        if step not in partial:
            write_json_atomic(tag / MANIFEST, manifest_of(tag))


def test_latest_is_replaced_atomically(tmp_path, monkeypatch):
    make_tags(tmp_path, [2, 4])
    checkpoints = str(tmp_path / "checkpoints")
    write_latest(checkpoints, "step-00000002")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    write_latest(checkpoints, "step-00000004")
    assert replaced and str(replaced[0][1]).endswith("/latest") and replaced[0][0] != replaced[0][1]
    assert read_latest(checkpoints) == "step-00000004"
    assert not [p for p in os.listdir(checkpoints) if ".tmp" in p]


def test_resume_latest_ignores_a_newer_partial_checkpoint(tmp_path):
    make_tags(tmp_path, [2, 4, 6], partial=[6])  # step 6: killed mid-save, latest not moved
    manager = CheckpointManager(str(tmp_path), keep_last=2, rank=0)
    write_latest(manager.dir, "step-00000004")
    assert resolve_resume(str(tmp_path), "latest") == os.path.join(manager.dir, "step-00000004")


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    assert resolve_resume(str(tmp_path), "latest") is None
    make_tags(tmp_path, [2], partial=[2])  # a partial first save: nothing to resume from
    assert resolve_resume(str(tmp_path), "latest") is None
    assert resolve_resume(str(tmp_path), None) is None
    tag = str(tmp_path / "checkpoints" / "step-00000002")
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        resolve_resume(str(tmp_path), tag)
    write_json_atomic(tmp_path / "checkpoints" / "step-00000002" / MANIFEST,
                      manifest_of(tmp_path / "checkpoints" / "step-00000002"))
    assert resolve_resume(str(tmp_path), tag).endswith("step-00000002")


def test_dangling_latest_without_any_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    write_latest(str(tmp_path / "checkpoints"), "step-00000008")
    with pytest.raises(ValueError, match="names 'step-00000008'.*refusing to restart from step 0"):
        read_latest(str(tmp_path / "checkpoints"))


def test_rotation_keeps_the_newest_and_drops_stale_partials(tmp_path):
    make_tags(tmp_path, [2, 4, 6, 8, 12], partial=[12])  # 12: killed before resuming at 6
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


def saved_run(tmp_path, world_size=1, **changes) -> tuple[str, dict]:
    """A checkpoint tag folder with the run record a 4-step run on `world_size` ranks writes."""
    cfg = TrainConfig(run_dir=str(tmp_path), data=DataConfig(train="x.tar"),
                      model=ModelConfig(student="Tiny-ViT-Student", teacher="Tiny-ViT-Teacher"))
    cfg.optim.total_steps = 4
    tag = tmp_path / "checkpoints" / tag_for_step(4)
    tag.mkdir(parents=True)
    global_batch = cfg.data.batch_size * world_size
    write_json_atomic(tag / "run.json", {"format": FORMAT_VERSION, "step": 4, "total_steps": 4,
                                         "world_size": world_size, "zero_stage": 0,
                                         "global_batch": global_batch, "lanes": world_size,
                                         "config": to_dict(cfg)})
    return str(tag), to_dict(cfg)


@pytest.mark.parametrize("key, value", [
    ("deepspeed.zero_stage", 1), ("deepspeed.precision", "bf16"),
    ("model.student", "Tiny-ViT-Teacher"),
    ("model.teacher", None), ("seed", 3), ("data.train", "y.tar"),
    ("model.fusion", {"kind": "film", "hidden": None, "heads": 1}),
    ("optim.param_groups", [{"name": "heads", "match": ["heads.*"], "lr": 2e-3,
                             "weight_decay": None}]),
])
def test_resume_refuses_a_changed_setting_in_one_line_naming_it(tmp_path, key, value):
    tag, config = saved_run(tmp_path)
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError) as err:
        check_resume(tag, config, world_size=1)
    message = str(err.value)
    assert "\n" not in message and f"{key}=" in message and tag in message
    assert f"set {key}=" in message  # says what to do


def test_resume_on_another_world_size_keeps_the_global_batch(tmp_path):
    """2 ranks x 32 per step: 1 rank takes 2 micro-batches of 32, 4 ranks 1 of 16 (batch size
    lowered by the user); 4 ranks of 32 or 3 ranks cannot (one line saying what to set)."""
    tag, config = saved_run(tmp_path, world_size=2)
    record = check_resume(tag, config, world_size=1)
    assert resume_accumulation(record, config, 1) == 2
    assert resume_accumulation(record, config, 2) == 1
    with pytest.raises(ConfigError, match="16 per rank on 4 ranks, which data.batch_size=32 does "
                                          "not divide; set data.batch_size=16"):
        resume_accumulation(record, config, 4)
    with pytest.raises(ConfigError, match="which 3 ranks cannot share equally: run on a number "
                                          "of ranks that divides 64"):
        resume_accumulation(record, config, 3)
    config["data"]["batch_size"] = 16
    assert resume_accumulation(record, config, 4) == 1
    config["data"]["batch_size"] = 32
    config["model"]["mask"] = {"target_sparsity": 0.5}
    with pytest.raises(ConfigError, match="needs optim.grad_accum_steps=2, and model.mask needs 1"):
        resume_accumulation(record, config, 1)
    config["model"]["mask"] = None
    record = check_resume(tag, config, world_size=2)
    config["optim"]["total_steps"], config["optim"]["lr"] = 8, 1e-3  # these may change
    assert check_resume(tag, config, world_size=2)["step"] == record["step"] == 4
    check_total_steps(record, 8)
    with pytest.raises(ConfigError, match="optim.total_steps: this run has 3 steps"):
        check_total_steps(record, 3)


def test_resume_refuses_a_checkpoint_without_run_record(tmp_path):
    make_tags(tmp_path, [2])  # an older format: no run.json
    with pytest.raises(ValueError, match="no run.json"):
        check_resume(str(tmp_path / "checkpoints" / tag_for_step(2)), {}, world_size=1)


def test_a_tag_is_hashed_once_per_process_and_a_changed_file_is_caught(tmp_path, monkeypatch):
    import json
    import training.checkpoint_files as files
    tag = tmp_path / "step-00000002"
    tag.mkdir()
    (tag / "weights.bin").write_bytes(b"12345678")
    (tag / files.MANIFEST).write_text(json.dumps(files.manifest_of(tag)))
    hashed = []
    real = files._sha256
    monkeypatch.setattr(files, "_sha256", lambda p: (hashed.append(p), real(p))[1])
    files.verify_tag(tag)
    files.verify_tag(tag)  # e.g. find_tag_dir, then read_module_state
    assert len(hashed) == 1
    (tag / "weights.bin").write_bytes(b"87654321")  # same size, other bytes
    with pytest.raises(ValueError, match="corrupt checkpoint file"):
        files.verify_tag(tag)
