"""Distilled vs from-scratch, per student, on the synthetic set after equal steps: retrieval mean
recall (R@1/5/10 both directions) and zero-shot top-1 of each export (clip-eval). Results: the
quality table of docs/students.md.

    nohup .venv/bin/python benchmarks/students_quality.py > students-quality.log 2>&1 &

The demo's setting (training/demo.py), made smaller for a loaded 2-core CPU: the synthetic set
(`--train` samples), the Tiny-ViT-Teacher trained contrastively (configs/tiny-clip.yaml,
`--teacher-steps` steps of `--batch`, one process) is the teacher; each tiny student trains
`--steps` steps of `--batch` in one process (one thread each: OMP_NUM_THREADS=1), distilled
(the demo's loss: affinity with the teacher's scale + contrastive + cosine features) or from
scratch (contrastive only), same seed and data.
Students: the tiny recipes of issue 11 and tiny stand-ins of the TinyCLIP ViT and ResNet students
(Tiny-ViT-Student, Inherit-Tiny-RN-Student). Each finished run is skipped on a rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.shards import make_synthetic_shards  # noqa: E402
from training.demo import DISTILL_LOSS, mean_recall  # noqa: E402

STUDENTS = {  # name: (recipe, extra overrides, extra overrides from scratch)
    "Mobile-CLIP-Tiny": ("configs/mobile-clip-tiny.yaml", [], []),
    "TinyCLIP-ConvFFN-Tiny": ("configs/tinyclip-convffn-tiny.yaml", [], []),
    # KDEOV distilled is the LiT student (the teacher's text tower); from scratch there is no
    # teacher to lend one: the same shape trains both towers, without the fusion head
    "KDEOV-Tiny": ("configs/kdeov-tiny.yaml", [], [
        "model.student=Tiny-KDEOV-Student", "model.fusion=null",
        "loss.terms.fused_feature.weight=0", "optim.param_groups=[]"]),
    "Tiny-ViT-Student (TinyCLIP ViT)": ("configs/tiny-distill.yaml", [], []),
    "Inherit-Tiny-RN-Student (TinyCLIP ResNet)": (
        "configs/tiny-distill.yaml", ["model.student=Inherit-Tiny-RN-Student"], []),
}
SCRATCH = ["model.teacher=null", "model.teacher_pretrained=null", "loss.affinity_weight=0",
           "loss.clip_weight=1", "loss.feature_weight=0", "loss.fixed_logit_scale=null"]


def train(config: str, run_dir: Path, overrides: list[str]) -> None:
    if (run_dir / "done.json").is_file():
        return
    started = time.monotonic()
    cmd = [sys.executable, "-m", "training", "--config", config, f"run_dir={run_dir}",
           "data.workers=1", "log.tensorboard=false", "checkpoint.every_steps=0",
           "optim.epochs=null", "checkpoint.resume=null", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"{run_dir.name}: trained in {time.monotonic() - started:.0f} s", flush=True)


def evaluate(export: Path, data: dict, out: Path) -> dict:
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "training.evaluation", "eval", "--checkpoint",
                        str(export), "--retrieval", str(data["val"]), "--zeroshot",
                        str(data["zeroshot"]), "--device", "cpu", "--out", str(out)],
                       cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL)
    record = json.loads(out.read_text())
    return {"mean_recall": 100 * mean_recall(record["retrieval"]),
            "top1": 100 * record["zeroshot"]["top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/students-quality")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train", type=int, default=2000, help="synthetic training samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    data = make_synthetic_shards(out / "data", train=args.train, val=200, zeroshot=240,
                                 samples_per_shard=500, seed=args.seed)
    common = [f"data.train={data['train_shards']}", f"data.batch_size={args.batch}",
              "optim.lr=1e-3", "optim.warmup_steps=10", f"seed={args.seed}"]
    teacher = out / "teacher"
    train("configs/tiny-clip.yaml", teacher, common + [f"optim.total_steps={args.teacher_steps}"])
    weights = teacher / "export" / "open_clip_model.safetensors"
    results = {"teacher": evaluate(teacher / "export", data, out / "eval-teacher.json")}
    rows = ["| student | distilled: mean recall | scratch: mean recall | distilled: zero-shot "
            "top-1 | scratch: zero-shot top-1 |", "|---|---:|---:|---:|---:|"]
    for index, (name, (config, extra, scratch)) in enumerate(STUDENTS.items()):
        for mode, overrides in (("distilled", ["model.teacher=Tiny-ViT-Teacher",
                                               f"model.teacher_pretrained={weights}",
                                               *DISTILL_LOSS]), ("scratch", SCRATCH + scratch)):
            run = out / f"{index}-{mode}"
            train(config, run, common + extra + overrides + [f"optim.total_steps={args.steps}"])
            results[f"{name}/{mode}"] = evaluate(run / "export", data, out / f"eval-{index}-{mode}.json")
        d, s = results[f"{name}/distilled"], results[f"{name}/scratch"]
        rows.append(f"| {name} | {d['mean_recall']:.1f} | {s['mean_recall']:.1f} | "
                    f"{d['top1']:.1f} | {s['top1']:.1f} |")
        print(rows[-1], flush=True)
    teacher_row = results["teacher"]
    table = "\n".join(rows) + (f"\n\nteacher (Tiny-ViT-Teacher, {args.teacher_steps} steps): mean "
                               f"recall {teacher_row['mean_recall']:.1f}, zero-shot top-1 "
                               f"{teacher_row['top1']:.1f}; students: {args.steps} steps of "
                               f"{args.batch}, seed {args.seed}, {args.train} training "
                               f"samples\n")
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table, end="")


if __name__ == "__main__":
    main()
