"""torchrun worker for tests/students/test_zero_stages.py: every tiny student at every ZeRO stage.

For each student (the tiny recipes of issue 11 and the LiT student of tiny-distill.yaml) and
each ZeRO stage 0-3: a Trainer (a real DeepSpeed engine) built from the recipe with the same
seed, data and teacher, trained STEPS steps of 4 per rank (fp32) and exported (OUT/STUDENT/
zeroS/export). Each rank writes OUT/rank<r>.json: {student: {stage: {"finished", "losses",
"trainable"}}}.
"""
from __future__ import annotations

import json

from tests.helpers.torchrun import worker_args
from tests.helpers.trainer import TINY_DISTILL, REPO_ROOT, step_losses, tiny_overrides
from training.config import load_config
from training.trainer import Trainer

STEPS = 2
STAGES = (0, 1, 2, 3)
STUDENTS = {  # name: (recipe, overrides)
    "mobile-clip-tiny": (str(REPO_ROOT / "configs" / "mobile-clip-tiny.yaml"), []),
    "tinyclip-convffn-tiny": (str(REPO_ROOT / "configs" / "tinyclip-convffn-tiny.yaml"), []),
    "kdeov-tiny": (str(REPO_ROOT / "configs" / "kdeov-tiny.yaml"), []),
    "lit": (TINY_DISTILL, ["model.student=lit:Tiny-LiT-Student"]),
}


def main() -> None:
    args, out, rank = worker_args("shards", "zeroshot", "val", "teacher")
    results = {}
    for name, (recipe, extra) in STUDENTS.items():
        results[name] = {}
        for stage in STAGES:
            run_dir = out / name / f"zero{stage}"
            trainer = Trainer(load_config(recipe, tiny_overrides(
                args.shards, run_dir, steps=STEPS, batch_size=4) + extra + [
                f"model.teacher_pretrained={args.teacher}", f"deepspeed.zero_stage={stage}",
                "checkpoint.export_at_end=true"]))
            trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.task.parameters()
                            if p.requires_grad)  # ZeRO-3: ds_numel, the unpartitioned size
            finished = trainer.train()
            results[name][stage] = {"finished": finished, "losses": step_losses(run_dir),
                                    "trainable": trainable}
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
