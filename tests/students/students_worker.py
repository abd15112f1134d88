"""torchrun worker for tests/students/test_students.py: every tiny student in one launch.

For each tiny recipe (configs/*-tiny.yaml of issue 11), at its ZeRO stage:
  reference: STEPS steps uninterrupted, checkpoints every 2 steps, evaluation (retrieval and
             zero-shot) at the end, export at the end;
  resumed:   the same run stopped after 2 steps (its own `total_steps=2` run), then resumed
             from its checkpoint to STEPS (no evaluation, no export).
The learning rate is constant (min_lr = lr), so the 2-step run follows the same schedule.
The test reads metrics.jsonl, the checkpoints and the exports.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tests.helpers.trainer import tiny_overrides
from training.config import load_config
from training.trainer import Trainer

STEPS = 4
STUDENTS = {"mobile-clip-tiny": 3, "tinyclip-convffn-tiny": 2, "kdeov-tiny": 0}  # ZeRO stage


def overrides(args, name: str, run: str, steps: int) -> list[str]:
    return tiny_overrides(args.shards, Path(args.out) / name / run, steps=STEPS) + [
        f"optim.total_steps={steps}", "optim.min_lr=5e-4", f"model.teacher_pretrained={args.teacher}",
        f"deepspeed.zero_stage={STUDENTS[name]}", "checkpoint.every_steps=2",
        "checkpoint.resume=latest", f"eval.val={args.val}", f"eval.zeroshot={args.zeroshot}",
        f"eval.at_end={run == 'reference'}", f"checkpoint.export_at_end={run == 'reference'}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--shards", "--val", "--zeroshot", "--teacher", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--students", nargs="*", default=list(STUDENTS))
    args = parser.parse_args()
    for name in args.students:
        recipe = f"configs/{name}.yaml"
        Trainer(load_config(recipe, overrides(args, name, "reference", STEPS))).train()
        Trainer(load_config(recipe, overrides(args, name, "resumed", 2))).train()
        Trainer(load_config(recipe, overrides(args, name, "resumed", STEPS))).train()


if __name__ == "__main__":
    main()
