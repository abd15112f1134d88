"""The objective's terms, one at a time and combined, on the demo's synthetic set (issue 12).

    python benchmarks/objectives_ablation.py [--out runs/objectives-ablation] [--seeds 0 1 2]
        [--variants scratch affinity ...] [--jobs 2] [--teacher-steps 600] [--student-steps 150]
        [--from-demo runs/demo]

The demo's data and teacher (training/demo.py's FULL scale: 4000 train / 200 val with 5 captions
/ 240 zero-shot images; Tiny-ViT-Teacher, contrastive only, batch 64, lr 1e-3), the teacher
trained once and reused by every run; then Tiny-ViT-Student from a random init for the demo's
student steps of 64 unless --student-steps says (docs/objectives.md: 150), lr 1e-3, one process
each (not torchrun), per variant and seed; each evaluated by
`clip-eval eval` (val retrieval, zero-shot top-1). The steps are the demo's own (`Demo.make_data`,
`Demo.train`); a run whose done.json / eval json exists is skipped, so the script resumes and
more seeds or variants can be added later. Prints (and writes OUT/ablation.md) the mean and the
spread (min-max) over the seeds of mean recall and zero-shot top-1, plus the teacher's loss per
window of 50 steps (to see that it converged). Every number comes from a run's eval json.
--from-demo DIR copies a finished demo's data, teacher export and teacher eval (seed 0, the same
scale) into OUT, so the teacher is not trained again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.demo import FULL, Demo, StepFailed, mean_recall  # noqa: E402

# Every variant starts from configs/tiny-distill.yaml with a random init (the recipe's
# inherited init would hide what each term does), the shorthand terms off and the models' own
# logit scales, then names its terms in loss.terms.
NO_SHORTHAND = ["model.student_init=null", "loss.affinity_weight=0", "loss.clip_weight=0",
                "loss.feature_weight=0", "loss.fixed_logit_scale=null"]
# [student block, teacher block]: the student's last of 2 blocks mimics the teacher's last of 4
BLOCKS = "{pairs: {image: [[1, 3]], text: [[1, 3]]}, kind: mse}"
RECOMMENDED = "clip: {}, feature: {kind: cosine}, interactive: {}"
VARIANTS = {
    # the clip term alone is training from scratch: no teacher at all
    "scratch": ["model.teacher=null", "model.teacher_pretrained=null", *NO_SHORTHAND,
                "loss.terms={clip: {}}"],
    "affinity": [*NO_SHORTHAND, "loss.terms={affinity: {}}"],
    "feature": [*NO_SHORTHAND, "loss.terms={feature: {kind: cosine}}"],
    "tempkd": [*NO_SHORTHAND, "loss.terms={tempkd: {}}"],
    "interactive": [*NO_SHORTHAND, "loss.terms={interactive: {}}"],
    "intermediate": [*NO_SHORTHAND, f"loss.terms={{intermediate: {BLOCKS}}}"],
    "attribution": [*NO_SHORTHAND, "loss.terms={attribution: {}}"],
    # combinations: the demo's loss before this ablation, then the recommended one (the demo's
    # DISTILL_LOSS since)
    "affinity+clip+feature": [*NO_SHORTHAND, "loss.terms={affinity: {}, clip: {}, "
                              "feature: {kind: cosine}}"],
    "clip+feature+interactive": [*NO_SHORTHAND, f"loss.terms={{{RECOMMENDED}}}"],
    # the recommended combination less one term each: which of its terms matters?
    "clip+feature": [*NO_SHORTHAND, "loss.terms={clip: {}, feature: {kind: cosine}}"],
    "clip+interactive": [*NO_SHORTHAND, "loss.terms={clip: {}, interactive: {}}"],
    "feature+interactive": [*NO_SHORTHAND, "loss.terms={feature: {kind: cosine}, interactive: {}}"],
    # the recommended combination plus one more term each: does any improve it?
    **{f"clip+feature+interactive+{name}": [*NO_SHORTHAND, f"loss.terms={{{RECOMMENDED}, {term}}}"]
       for name, term in [("tempkd", "tempkd: {}"), ("intermediate", f"intermediate: {BLOCKS}"),
                          ("attribution", "attribution: {}"), ("affinity", "affinity: {}")]},
}


def run_variant(demos: dict[int, Demo], variant: str, seed: int) -> dict:
    """Train one student (skipped when done) and evaluate it (skipped when evaluated)."""
    demo, name = demos[seed], f"{variant}-s{seed}"
    teacher = f"model.teacher_pretrained={demo.out / 'teacher/export/open_clip_model.safetensors'}"
    s = demo.scale
    demo.train(name, "configs/tiny-distill.yaml", s.student_steps, s.student_lr,
               [teacher, *VARIANTS[variant]], ranks=1)
    return evaluate(demo, name)


def evaluate(demo: Demo, name: str) -> dict:
    path = demo.out / "eval" / f"{name}.json"
    if not path.is_file():
        demo.run(f"eval-{name}", ["-m", "training.evaluation", "eval", "--checkpoint",
                                  str(demo.out / name / "export"), "--retrieval",
                                  str(demo.data / "val"), "--zeroshot",
                                  str(demo.data / "zeroshot"), "--device", "cpu", "--out",
                                  str(path)])
    return json.loads(path.read_text())


# what --from-demo copies: everything the ablation reads of the data and the teacher
DEMO_PARTS = ("data", "teacher/export", "teacher/done.json", "teacher/metrics.jsonl",
              "eval/teacher.json")


def reuse_demo(demo_out: Path, out: Path, scale) -> None:
    """Copy a finished demo's data and teacher into OUT (parts already there are kept)."""
    settings = demo_out / "demo.json"
    if not settings.is_file():
        raise StepFailed(f"--from-demo {demo_out}: no demo.json (not a demo's --out)")
    theirs = json.loads(settings.read_text())
    wanted = {"seed": 0, **{key: value for key, value in asdict(scale).items()
                            if key != "student_steps"}}  # the students are the ablation's own
    found = {"seed": theirs.get("seed"), **theirs.get("scale", {})}
    differ = [f"{key} {found.get(key)} (needs {value})" for key, value in wanted.items()
              if found.get(key) != value]
    if differ:
        raise StepFailed(f"--from-demo {demo_out}: made with {', '.join(differ)}")
    missing = [part for part in DEMO_PARTS if not (demo_out / part).exists()]
    if missing:
        raise StepFailed(f"--from-demo {demo_out}: missing {', '.join(missing)} "
                         "(an unfinished demo?)")
    for part in DEMO_PARTS:
        source, target = demo_out / part, out / part
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)


def quality(record: dict) -> tuple[float, float]:
    """(mean recall, zero-shot top-1) in percent."""
    return 100 * mean_recall(record["retrieval"]), 100 * record["zeroshot"]["top1"]


def loss_windows(metrics_jsonl: Path, window: int = 50) -> list[str]:
    """The training loss averaged per window of steps: flat at the end = converged."""
    by_window: dict[int, list[float]] = {}
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_window.setdefault((int(record["step"]) - 1) // window, []).append(record["loss"])
    return [f"steps {w * window + 1}-{(w + 1) * window}: {sum(v) / len(v):.3f}"
            for w, v in sorted(by_window.items())]


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f} (1 seed)"
    return f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})"


def table(results: dict[str, dict[int, dict]]) -> list[str]:
    rows = ["| variant | seeds | mean recall: mean (min-max) | zero-shot top-1: mean (min-max) "
            "| mean recall per seed | zero-shot per seed |", "|---|---|---|---|---|---|"]
    for variant, by_seed in results.items():
        seeds = sorted(by_seed)
        recall = [quality(by_seed[s])[0] for s in seeds]
        top1 = [quality(by_seed[s])[1] for s in seeds]
        rows.append(f"| {variant} | {', '.join(map(str, seeds))} | {spread(recall)} | "
                    f"{spread(top1)} | {' / '.join(f'{v:.1f}' for v in recall)} | "
                    f"{' / '.join(f'{v:.1f}' for v in top1)} |")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/objectives-ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    parser.add_argument("--teacher-steps", type=int, default=FULL.teacher_steps)
    parser.add_argument("--student-steps", type=int, default=FULL.student_steps)
    parser.add_argument("--from-demo", metavar="DIR",
                        help="copy the data and teacher of a finished training/demo.py run "
                        "(its --out) instead of making them")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: the table of the runs already evaluated in OUT")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    os.chdir(ROOT)  # configs/ paths are repository-relative
    scale = replace(FULL, teacher_steps=args.teacher_steps, student_steps=args.student_steps)
    # one Demo per student seed, all on the same OUT: the data and the teacher are seed 0's
    demos = {seed: Demo(out, scale, seed) for seed in {0, *args.seeds}}
    try:
        if args.from_demo and not args.table_only:
            reuse_demo(Path(args.from_demo).resolve(), out, scale)
        if not args.table_only:
            demos[0].make_data()
            demos[0].train("teacher", "configs/tiny-clip.yaml", scale.teacher_steps, scale.teacher_lr,
                           ["eval.every_steps=50", f"eval.val={demos[0].data / 'val'}"],
                           ranks=1)
        teacher = evaluate(demos[0], "teacher")
        jobs = [(variant, seed) for seed in args.seeds for variant in args.variants
                if not args.table_only or (out / "eval" / f"{variant}-s{seed}.json").is_file()]
        with ThreadPoolExecutor(args.jobs) as pool:
            records = list(pool.map(lambda job: run_variant(demos, *job), jobs))
    except StepFailed as err:
        print(f"objectives_ablation: error: {err}", file=sys.stderr)
        return 2
    results: dict[str, dict[int, dict]] = {}
    for (variant, seed), record in zip(jobs, records):
        results.setdefault(variant, {})[seed] = record
    recall, top1 = quality(teacher)
    text = "\n".join([
        f"# Objective ablation ({scale.student_steps} student steps of {scale.batch}, "
        f"teacher {scale.teacher_steps} steps)", "",
        f"Teacher (Tiny-ViT-Teacher): mean recall {recall:.1f}, zero-shot top-1 {top1:.1f}; "
        "training loss per window: " + "; ".join(loss_windows(out / "teacher" / "metrics.jsonl")),
        "", *table(results)]) + "\n"
    (out / "ablation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
