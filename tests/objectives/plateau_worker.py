"""Worker for test_plateau.py (one process: the imports and the teacher are paid once).

Usage: plateau_worker.py ROOT CASES.json OUT.json. Writes synthetic shards under ROOT, trains a
tiny teacher briefly (configs/tiny-clip.yaml: Tiny-ViT-Teacher, contrastive only) and exports it,
then for every case and seed runs the case's tiny config (its models, data, optimizer and rate,
no warm-up) with
the recipe's `loss` section, `model.fusion` and `model.student_init`, distilling from that
teacher with real Trainers. CASES.json: {case: {"config": path, "loss": {...}, "fusion": {...}
or null, "init": "teacher" or null, "term": the term to record}}. OUT.json: {"teacher_clip":
the teacher's last contrastive losses, "batch": B, case: {seed: [term at steps 1..STEPS]}}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.trainer import TINY_CLIP, step_losses, tiny_overrides
from training.config import load_config
from training.trainer import Trainer

BATCH, TEACHER_STEPS, STEPS, SEEDS = 32, 60, 30, (0, 1, 2)


def run(config: str, run_dir: Path, steps: int, train: str, term: str, *extra: str
        ) -> dict[int, float]:
    lr = load_config(config, ["data.train=unused", "model.teacher_pretrained=null",
                              "model.student_init=null"]).optim.lr  # the recipe's own rate
    overrides = tiny_overrides(train, run_dir, steps, batch_size=BATCH) + [
        f"optim.lr={lr}", "log.every_steps=1", *extra]
    Trainer(load_config(config, overrides)).train()
    return step_losses(run_dir, term)


def main(argv: list[str]) -> None:
    root, cases = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    train = make_synthetic_shards(root / "shards", train=512, val=0, zeroshot=0,
                                  samples_per_shard=128)["train_shards"]
    teacher = run(TINY_CLIP, root / "teacher", TEACHER_STEPS, train, "clip",
                  "optim.warmup_steps=10", "checkpoint.export_at_end=true")
    results = {"batch": BATCH, "teacher_clip": [teacher[s] for s in sorted(teacher)][-5:]}
    weights = root / "teacher" / "export" / "open_clip_model.safetensors"
    for name, case in cases.items():
        fusion = [f"model.fusion={json.dumps(case['fusion'])}"] if case["fusion"] else []
        results[name] = {}
        for seed in SEEDS:
            losses = run(case["config"], root / f"{name}-{seed}", STEPS, train, case["term"],
                         f"model.teacher_pretrained={weights}", f"seed={seed}",
                         f"model.student_init={case['init'] or 'null'}",
                         "checkpoint.export_at_end=false", f"loss={json.dumps(case['loss'])}",
                         *fusion)
            results[name][seed] = [losses[s] for s in sorted(losses)]
            print(name, seed, " ".join(f"{v:.2f}" for v in results[name][seed]), flush=True)
    Path(argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
