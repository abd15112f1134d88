"""torchrun worker for tests/students/test_students.py: the tiny two-tower students in one launch.

For each tiny recipe (configs/mobile-clip-tiny.yaml, tinyclip-convffn-tiny.yaml; kdeov-tiny.yaml
has its own worker, students_worker.py), at its ZeRO stage and accumulation:
  reference: STEPS steps uninterrupted, checkpoints every 2 steps, evaluation (retrieval and
             zero-shot) at the end, export at the end;
  resumed:   a new run folder holding only the reference's step-2 checkpoint (what a run
             stopped after step 2 leaves), resumed to STEPS (no evaluation, no export).
Each rank also saves its normalisation running statistics after the reference run. The test reads
metrics.jsonl, the checkpoints, the exports and those statistics.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers.trainer import tiny_overrides
from training.config import load_config
from training.trainer import Trainer

STEPS = 4
# ZeRO stage and settings: TinyCLIP-ConvFFN (dropout heads, TinyViT's BatchNorm, its heads in
# their own learning-rate group) with 2 feature-cached micro-batches of 4 per step.
STUDENTS = {"mobile-clip-tiny": ["deepspeed.zero_stage=3"],
            "tinyclip-convffn-tiny": ["deepspeed.zero_stage=2", "optim.grad_accum_steps=2",
                                      "data.batch_size=4"]}


def overrides(args, name: str, run: str) -> list[str]:
    return tiny_overrides(args.shards, Path(args.out) / name / run, steps=STEPS) + [
        f"model.teacher_pretrained={args.teacher}",
        *STUDENTS[name], "checkpoint.every_steps=2",
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
        reference = Trainer(load_config(recipe, overrides(args, name, "reference")))
        reference.train()
        torch.save({key: value for key, value in reference.task.named_buffers()
                    if "running_" in key}, Path(args.out) / name / f"stats-{dist.get_rank()}.pt")
        if dist.get_rank() == 0:
            tag = "step-00000002"
            source, target = (Path(args.out) / name / run / "checkpoints"
                              for run in ("reference", "resumed"))
            shutil.copytree(source / tag, target / tag)
            (target / "latest").write_text(tag)
        dist.barrier()
        Trainer(load_config(recipe, overrides(args, name, "resumed"))).train()


if __name__ == "__main__":
    main()
