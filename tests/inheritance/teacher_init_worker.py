"""Worker for test_teacher_init.py (one process: real Trainers, in-process, single rank).

Usage: teacher_init_worker.py ROOT OUT.json. With a random Tiny-ViT-Teacher saved as a weights
file: `clip-inherit` (its default rule) writes the student file; then configs/tiny-distill.yaml
runs 4 steps with model.student_init=teacher ("teacher", its student's weights before the first
step compared with the file's), with student_init=that file ("file"), and with
student_init=teacher stopped by SIGUSR1 after step 2 and resumed ("resumed"; the resumed Trainer
must not inherit again); and mobile-clip-tiny with student_init=teacher (a student that cannot
inherit: the error). OUT.json: {"init_equal", "init_tensors", "losses": {run: {step: loss}},
"stopped_at", "refusal"}.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import training.inheritance.inherit as inheritance
from training.inheritance.cli import main as clip_inherit
from tests.helpers.inheritance import model
from tests.helpers.shards import make_synthetic_shards
from tests.helpers.trainer import REPO_ROOT, TINY_DISTILL, step_losses, tiny_overrides
from training.config import load_config
from training.trainer import Trainer

STEPS = 4


class StopAfterTwo(Trainer):
    """SIGUSR1 to itself after step 2: the preemption path writes a checkpoint and returns."""

    def after_step(self, values, data_wait_s):
        super().after_step(values, data_wait_s)
        if self.train_state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)


def overrides(root: Path, run: str, init: str, teacher: Path, train: str) -> list[str]:
    return tiny_overrides(train, root / run, STEPS) + [
        f"model.student_init={init}", f"model.teacher_pretrained={teacher}",
        "checkpoint.every_steps=2", "checkpoint.resume=latest", "checkpoint.export_at_end=false"]


def main(argv: list[str]) -> None:
    root = Path(argv[0])
    train = make_synthetic_shards(root / "shards", train=64, val=0, zeroshot=0,
                                  samples_per_shard=32)["train_shards"]
    teacher = root / "teacher.safetensors"
    save_file(model("Tiny-ViT-Teacher", seed=3).state_dict(), str(teacher))
    assert clip_inherit(["--teacher", "Tiny-ViT-Teacher", "--teacher-pretrained",
                                 str(teacher), "--student", "Tiny-ViT-Student",
                                 "--out", str(root / "inherit")]) == 0
    inherited = load_file(str(root / "inherit" / "student.safetensors"))
    out: dict = {"losses": {}}

    trainer = Trainer(load_config(TINY_DISTILL, overrides(root, "teacher", "teacher", teacher, train)))
    start = trainer.task.student.state_dict()
    out["init_tensors"] = len(inherited)
    out["init_equal"] = sorted(k for k, v in inherited.items()
                               if k in start and torch.equal(start[k].reshape(v.shape), v))
    trainer.train()
    file = str(root / "inherit" / "student.safetensors")
    Trainer(load_config(TINY_DISTILL, overrides(root, "file", file, teacher, train))).train()

    stopped = StopAfterTwo(load_config(TINY_DISTILL, overrides(root, "resumed", "teacher", teacher, train)))
    stopped.train()
    out["stopped_at"] = stopped.train_state.step

    def no_inheritance_on_resume(*_args):
        raise AssertionError("inherited again on resume")
    inherit, inheritance.inherit_from_teacher = (inheritance.inherit_from_teacher,
                                                     no_inheritance_on_resume)
    Trainer(load_config(TINY_DISTILL, overrides(root, "resumed", "teacher", teacher, train))).train()
    inheritance.inherit_from_teacher = inherit
    for run in ("teacher", "file", "resumed"):
        out["losses"][run] = step_losses(root / run)

    mobile = str(REPO_ROOT / "configs" / "mobile-clip-tiny.yaml")
    try:
        Trainer(load_config(mobile, overrides(root, "mobile", "teacher", teacher, train)))
        out["refusal"] = None
    except ValueError as err:
        out["refusal"] = str(err)
    Path(argv[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
