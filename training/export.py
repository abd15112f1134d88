"""The student out of a checkpoint, as a deployable model folder (`clip-train --export`, and
every run's RUN_DIR/export at the end).

    export_checkpoint("runs/x/checkpoints/step-00000100", "runs/x/export")

Reads the checkpoint offline (training/checkpoint_files.py), keeps the task's student (its heads
are training-only, training/task.py) and writes it through its model spec (open_clip's
local-dir: format for open_clip students). A masked student (`model.mask`) is pruned first
(training/inheritance/prune.py): uniform -> open_clip format, per_layer -> pruned_config.json +
weights for `load_pruned`.
"""
from __future__ import annotations

import os
from pathlib import Path

from training.checkpoint_files import read_module_state, read_run_record
from training.specs import model_spec
from training.task import DistillationTask


def export_checkpoint(tag_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    model_cfg = read_run_record(tag_dir)["config"]["model"]
    student = DistillationTask.student_state(read_module_state(tag_dir))
    if model_cfg.get("mask"):
        from training.inheritance.prune import export_pruned_student
        return Path(export_pruned_student(student, model_cfg["student"], model_cfg["mask"],
                                          out_dir))
    return model_spec(model_cfg["student"]).export(student, out_dir)
