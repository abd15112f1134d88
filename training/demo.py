"""`make demo` (`python -m training.demo`): the whole pipeline on the embedded synthetic set.

    python -m training.demo [--out runs/demo] [--quick] [--seed 0]

Seven steps, each a subprocess running one of the project's CLIs, exactly as a user would:

1. data       `clip-data synthetic` (train, val retrieval split, zero-shot set), `clip-data verify`
2. teacher    Tiny-ViT-Teacher, contrastive only (configs/tiny-clip.yaml), one process
3. distilled  Tiny-ViT-Student distilled from the teacher (configs/tiny-distill.yaml) from a
              random init (model.student_init=null), torchrun, 2 ranks, DeepSpeed ZeRO-1
4. scratch    the same student, same steps and launch, contrastive only (no teacher)
5. inherited  TinyCLIP's recipe: `clip-inherit` from the teacher into the student, then
              distilled like step 3 but from the teacher's embeddings stored beside the shards
              (`clip-data embed`, then model.teacher_source=shards: no teacher runs during that
              training)
6. evaluate   `clip-eval eval` on the four exports (val retrieval R@1/5/10, zero-shot top-1)
7. report     the table (printed and OUT/results.md), `clip-eval report` (plots), how many
              steps the inherited run needed to reach the scratch run's final retrieval quality,
              and the stored-embedding student's steps/s against the live-teacher student's

A step is skipped when its output is complete (a run's done.json, an eval record, ...), and a
training run that was interrupted resumes from its last checkpoint (`checkpoint.resume=latest`),
so a rerun is cheap and an interrupted demo continues. Each subprocess writes to OUT/logs/; the
console gets one line per step. Exit status 1 when a check fails (issue 12's bar: the inherited
+ distilled student's mean recall and zero-shot top-1 are not both above scratch's, or its mean
recall is below 90% of the teacher's; or inheritance does not reach the scratch run's quality in
fewer steps), 2 when a step's command fails (the end of its log is printed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Retrieval quality = mean of R@1/5/10 in both directions (the "mean recall" of the field).
RECALLS = [f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image")
           for k in (1, 5, 10)]
# The distillation loss of steps 3 and 5 (the same for both): contrastive + cosine feature
# distillation + CLIP-KD's interactive contrastive term, weight 1 each, the models' own learned
# logit scales. The best combination of the objective ablation (docs/objectives.md "Ablation",
# benchmarks/objectives_ablation.py: this demo's data and 600-step teacher, 150 student steps from
# a random init, 3 seeds): mean recall 60.0 and zero-shot top-1 43.2 against scratch's 42.4 and
# 34.4. Every term works from stored teacher embeddings too (step 5).
DISTILL_LOSS = ["loss.affinity_weight=0", "loss.clip_weight=1", "loss.feature_weight=1",
                "loss.feature_kind=cosine", "loss.fixed_logit_scale=null",
                "loss.terms={interactive: {}}"]
# Issue 12's bar for the inherited + distilled student: this share of the teacher's mean recall.
TEACHER_SHARE = 0.9
# Step 5's teacher: its embeddings of N crops per training image, stored beside the shards.
STORED = {"name": "teacher-embeddings", "augmentations": 2, "dtype": "fp16"}
RUNS = ("teacher", "distilled", "scratch", "inherited")
LABELS = {"teacher": "teacher (Tiny-ViT-Teacher)", "distilled": "distilled student",
          "scratch": "student from scratch", "inherited": "inherited + distilled student"}


@dataclass(frozen=True)
class Scale:
    """How big the demo is. FULL: a teacher converged for its schedule, and the students' steps
    at which the bar holds with a margin on seeds 0-2 (docs/demo.md)."""
    train: int           # synthetic training samples
    val: int             # retrieval images (5 captions each)
    zeroshot: int        # labelled images (24 classes)
    samples_per_shard: int
    batch: int           # global batch (split over the 2 student ranks)
    teacher_steps: int
    teacher_lr: float
    student_steps: int
    student_lr: float
    inherited_lr: float  # step 5: inherited weights train best at a higher rate (docs/demo.md)
    eval_every: int      # periodic evaluation of the students (for steps-to-quality)


FULL = Scale(train=4000, val=200, zeroshot=240, samples_per_shard=1000, batch=64,
             teacher_steps=600, teacher_lr=1e-3, student_steps=300, student_lr=1e-3,
             inherited_lr=2e-3, eval_every=25)
QUICK = Scale(train=256, val=32, zeroshot=48, samples_per_shard=128, batch=16,
              teacher_steps=4, teacher_lr=1e-3, student_steps=4, student_lr=1e-3,
              inherited_lr=1e-3, eval_every=2)


class StepFailed(RuntimeError):
    """A subprocess exited non-zero; the message names the step and its log."""


class Demo:
    def __init__(self, out: Path, scale: Scale, seed: int, enforce_checks: bool = True):
        self.out, self.scale, self.seed = out, scale, seed
        # --quick: the numbers of a few steps mean nothing, so a check that does not hold is
        # reported as such, neither as a failure nor in the exit status
        self.check_label = "CHECK FAILED" if enforce_checks else "check not met (not enforced with --quick)"
        self.enforce_checks = enforce_checks
        self.data = out / "data"
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        # One intra-op thread per process unless the user says otherwise: torchrun does the same
        # for the students, and on a shared 2-core machine a 2-thread teacher step was 5-10x
        # slower than a 1-thread one (threads fighting other processes for the cores).
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "1"}

    # ---- plumbing -------------------------------------------------------------------------
    def say(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[demo {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {message}", flush=True)

    def run(self, name: str, args: list[str]) -> None:
        """Run `python ARGS` with its output in OUT/logs/NAME.log; raise StepFailed on error."""
        log_path = self.logs / f"{name}.log"
        started = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"$ {sys.executable} {' '.join(args)}\n")
            log.flush()
            code = subprocess.call([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                   env=self.env)
        if code != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise StepFailed(f"{name} failed (exit {code}); last lines of {log_path}:\n"
                             + "\n".join(tail))
        self.say(f"  {name} finished in {time.perf_counter() - started:.0f} s (log: {log_path})")

    def shards(self, split: str) -> str:
        count = -(-getattr(self.scale, split) // self.scale.samples_per_shard)
        return str(self.data / split / f"shard-{{000000..{count - 1:06d}}}.tar")

    # ---- 1. data --------------------------------------------------------------------------
    def make_data(self) -> None:
        report = self.data / "verify.json"
        if report.is_file():
            self.say(f"[1/7] data: {self.data} already generated and verified, skipped")
            return
        s = self.scale
        self.say(f"[1/7] data: synthetic set, {s.train} train / {s.val} val (5 captions) / "
                 f"{s.zeroshot} zero-shot images -> {self.data}")
        self.run("data", ["-m", "data_tools", "synthetic", str(self.data), "--train", str(s.train),
                          "--val", str(s.val), "--zeroshot", str(s.zeroshot),
                          "--seed", str(self.seed), "--samples-per-shard",
                          str(s.samples_per_shard), "--no-progress"])
        self.run("verify", ["-m", "data_tools", "verify", "--json", str(report),
                            *(str(self.data / split) for split in ("train", "val", "zeroshot"))])

    # ---- 2-5. training --------------------------------------------------------------------
    def train(self, name: str, config: str, steps: int, lr: float, overrides: list[str],
              ranks: int) -> None:
        """One training run under OUT/NAME; skipped when done.json says it completed."""
        run_dir = self.out / name
        if (run_dir / "done.json").is_file():
            self.say(f"  {name}: {run_dir} complete, skipped")
            return
        s = self.scale
        launch = ["-m", "training"] if ranks == 1 else [
            "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "-m", "training"]
        self.run(name, [*launch, "--config", config, f"run_dir={run_dir}", f"seed={self.seed}",
                        f"data.train={self.shards('train')}", f"data.batch_size={s.batch // ranks}",
                        "data.workers=0", "optim.epochs=null", f"optim.total_steps={steps}",
                        f"optim.lr={lr}", f"optim.warmup_steps={max(1, steps // 10)}",
                        f"log.every_steps={max(1, min(10, steps // 10))}",
                        f"checkpoint.every_steps={max(1, steps // 3)}", "checkpoint.resume=latest",
                        "eval.at_end=false", *overrides])

    def student_runs(self) -> None:
        s = self.scale
        teacher_weights = self.out / "teacher" / "export" / "open_clip_model.safetensors"
        periodic_eval = [f"eval.every_steps={s.eval_every}", f"eval.val={self.data / 'val'}"]
        distill = ["configs/tiny-distill.yaml", s.student_steps, s.student_lr]
        teacher = [f"model.teacher_pretrained={teacher_weights}", *DISTILL_LOSS]

        self.say(f"[3/7] distilled: Tiny-ViT-Student distilled from the teacher, {s.student_steps}"
                 f" steps of {s.batch}, torchrun 2 ranks, DeepSpeed ZeRO-1")
        self.train("distilled", *distill, teacher + periodic_eval + ["model.student_init=null"],
                   ranks=2)

        self.say("[4/7] scratch: the same student from scratch, contrastive only, same steps")
        self.train("scratch", *distill, ["model.teacher=null", "model.teacher_pretrained=null",
                                         "model.student_init=null",
                                         "loss.affinity_weight=0",
                                         "loss.clip_weight=1", "loss.fixed_logit_scale=null",
                                         *periodic_eval], ranks=2)

        self.say(f"[5/7] inherited: student weights inherited from the teacher, then distilled "
                 f"from the teacher's stored embeddings ({STORED['augmentations']} crops per "
                 f"image, {STORED['dtype']})")
        inherit_dir = self.out / "inherit"
        if not (self.out / "inherited" / "done.json").is_file():  # else the run needs them no more
            self.run("inherit", ["-m", "training.inheritance", "--teacher", "Tiny-ViT-Teacher",
                                 "--teacher-pretrained", str(teacher_weights),
                                 "--student", "Tiny-ViT-Student", "--out", str(inherit_dir)])
            # Two processes (torchrun, each embeds its slice of the shards; the files do not
            # depend on how many): the students' ranks run two at a time too.
            self.run("embed", ["-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", "-m", "data_tools", "embed",
                               self.shards("train"),
                               "--name", STORED["name"], "--teacher", "Tiny-ViT-Teacher",
                               "--pretrained", str(teacher_weights),
                               "--augmentations", str(STORED["augmentations"]),
                               "--dtype", STORED["dtype"], "--seed", str(self.seed),
                               "--device", "cpu", "--no-progress"])
        self.train("inherited", distill[0], s.student_steps, s.inherited_lr,
                   teacher + periodic_eval + [
                       f"model.student_init={inherit_dir / 'student.safetensors'}",
                       "model.teacher_source=shards",
                       f"model.teacher_embeddings={STORED['name']}"], ranks=2)

    # ---- 6. evaluation --------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict]:
        records = {}
        for name in RUNS:
            path = self.out / "eval" / f"{name}.json"
            if not path.is_file():
                self.run(f"eval-{name}", [
                    "-m", "training.evaluation", "eval", "--checkpoint",
                    str(self.out / name / "export"), "--retrieval", str(self.data / "val"),
                    "--zeroshot", str(self.data / "zeroshot"), "--device", "cpu",
                    "--out", str(path)])
            records[name] = json.loads(path.read_text())
        return records

    # ---- 7. report ------------------------------------------------------------------------
    def report(self, records: dict[str, dict]) -> list[str]:
        """Write results.md and the plots; return the failed checks (empty: all hold)."""
        quality = {name: mean_recall(records[name]["retrieval"]) for name in RUNS}
        target = quality["scratch"]
        reached = {name: steps_to_reach(self.out / name / "metrics.jsonl", target)
                   for name in ("scratch", "inherited", "distilled")}
        at = {name: "never" if step is None else step for name, step in reached.items()}
        table = results_table(records, quality)
        speedup = (f"{reached['scratch'] / reached['inherited']:.2f}x"
                   if reached["inherited"] and reached["scratch"] else "n/a")
        rate = {name: steps_per_second(self.out / name / "metrics.jsonl", self.scale.eval_every)
                for name in ("distilled", "inherited")}
        summary = [
            f"Scratch's final mean recall ({target:.4f}) was first reached at step "
            f"{at['scratch']} by the scratch run, {at['inherited']} by the inherited run "
            f"and {at['distilled']} by the distilled run (of {self.scale.student_steps}; "
            f"periodic evaluation every {self.scale.eval_every} steps): inheritance needs "
            f"{speedup} fewer steps.", "",
            f"Training from the teacher's stored embeddings (inherited run, no teacher forward) "
            f"ran at {format_rate(rate['inherited'])} steps/s against "
            f"{format_rate(rate['distilled'])} for the live teacher (distilled run, same student, "
            f"batch and ranks): {format_ratio(rate['inherited'], rate['distilled'])} (median "
            f"step time of the logged windows without an evaluation, wall clock)."]
        zeroshot = {name: records[name]["zeroshot"]["top1"] for name in RUNS}
        summary += ["", f"The inherited + distilled student (TinyCLIP's recipe): mean recall "
                        f"{100 * quality['inherited']:.1f} against scratch's "
                        f"{100 * quality['scratch']:.1f}, {quality['inherited'] / quality['teacher']:.0%} "
                        f"of the teacher's {100 * quality['teacher']:.1f}; zero-shot top-1 "
                        f"{100 * zeroshot['inherited']:.1f} against scratch's "
                        f"{100 * zeroshot['scratch']:.1f}."]
        failures = bar_failures(quality, zeroshot)
        if not reached["inherited"] or reached["inherited"] >= reached["scratch"]:
            failures.append(f"the inherited run reached scratch's final quality at step "
                            f"{at['inherited']}, not before scratch's {at['scratch']}")
        text = "\n".join(["# Demo results", "", *table, "", *summary, "",
                          *(f"{self.check_label}: {f}" for f in failures)]) + "\n"
        (self.out / "results.md").write_text(text)
        self.run("report", ["-m", "training.evaluation", "report",
                            *(str(self.out / name) for name in RUNS),
                            "--labels", *RUNS, "--out", str(self.out / "report")])
        print("\n" + text, flush=True)
        return failures

    def check_settings(self) -> None:
        """Steps are skipped by the existence of their outputs, so an OUT made with other
        settings would mix two demos: refuse it (one line) before any work."""
        settings = {"scale": asdict(self.scale), "seed": self.seed, "distill_loss": DISTILL_LOSS,
                    "stored_embeddings": STORED}
        path = self.out / "demo.json"
        if path.is_file() and json.loads(path.read_text()) != settings:
            raise StepFailed(f"{self.out} holds a demo made with other settings ({path}); "
                             "delete it or choose another --out")
        path.write_text(json.dumps(settings, indent=1) + "\n")

    def __call__(self) -> int:
        s = self.scale
        self.check_settings()
        self.make_data()
        self.say(f"[2/7] teacher: Tiny-ViT-Teacher, contrastive only, {s.teacher_steps} steps "
                 f"of {s.batch}, one process")
        self.train("teacher", "configs/tiny-clip.yaml", s.teacher_steps, s.teacher_lr,
                   [f"eval.every_steps={2 * s.eval_every}", f"eval.val={self.data / 'val'}"],
                   ranks=1)
        self.student_runs()
        self.say("[6/7] evaluate: val retrieval and zero-shot of the four exports")
        records = self.evaluate()
        self.say(f"[7/7] report: {self.out / 'results.md'}, plots in {self.out / 'report'}")
        failures = self.report(records)
        if not self.enforce_checks:
            self.say("done (--quick: plumbing checked, checks not enforced)")
            return 0
        for failure in failures:
            print(f"demo: {self.check_label}: {failure}", file=sys.stderr)
        self.say("done" if not failures else "done, with failed checks")
        return 1 if failures else 0


def bar_failures(quality: dict[str, float], zeroshot: dict[str, float]) -> list[str]:
    """Issue 12's bar on the inherited + distilled student, each miss named: mean recall above
    scratch's and at least TEACHER_SHARE of the teacher's; zero-shot top-1 above scratch's."""
    failures = []
    if quality["inherited"] <= quality["scratch"]:
        failures.append(f"inherited + distilled mean recall {quality['inherited']:.4f} <= "
                        f"scratch {quality['scratch']:.4f}: it did not beat from-scratch")
    if quality["inherited"] < TEACHER_SHARE * quality["teacher"]:
        failures.append(f"inherited + distilled mean recall {quality['inherited']:.4f} is "
                        f"{quality['inherited'] / quality['teacher']:.1%} of the teacher's "
                        f"{quality['teacher']:.4f}, below {TEACHER_SHARE:.0%}")
    if zeroshot["inherited"] <= zeroshot["scratch"]:
        failures.append(f"inherited + distilled zero-shot top-1 {zeroshot['inherited']:.4f} <= "
                        f"scratch {zeroshot['scratch']:.4f}: it did not beat from-scratch")
    return failures


def metric_records(metrics_jsonl: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per line (training and evaluation records)."""
    return [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]


def steps_per_second(metrics_jsonl: Path, eval_every: int) -> float | None:
    """1 / the median step time of a run's logged windows, leaving out its first window
    (start-up) and every window in which a periodic evaluation ran (after its step's log)."""
    times, previous = [], None
    for record in metric_records(metrics_jsonl):
        if "step_time_s" not in record:
            continue
        step = int(record["step"])
        if previous is not None and not any(e % eval_every == 0 for e in range(previous, step)):
            times.append(record["step_time_s"])
        previous = step
    return 1 / statistics.median(times) if times else None


def format_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.2f}"


def format_ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def mean_recall(retrieval: dict) -> float:
    return sum(retrieval[key] for key in RECALLS) / len(RECALLS)


def steps_to_reach(metrics_jsonl: Path, target: float) -> int | None:
    """First periodic-evaluation step whose mean recall is >= target (None: never)."""
    for record in metric_records(metrics_jsonl):
        values = [record.get(f"eval/val/{key}") for key in RECALLS]
        if None not in values and sum(values) / len(values) >= target - 1e-9:
            return int(record["step"])
    return None


def results_table(records: dict[str, dict], quality: dict[str, float]) -> list[str]:
    """Markdown rows: one per run, retrieval R@1/5/10 both ways, mean recall, zero-shot top-1."""
    head = ("| model | params | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 "
            "| mean recall | zero-shot top-1 |")
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for name in RUNS:
        ret, zs = records[name]["retrieval"], records[name]["zeroshot"]
        params = count_params(Path(records[name]["checkpoint"]))
        rows.append(f"| {LABELS[name]} | {params} | " + " | ".join(
            f"{100 * ret[key]:.1f}" for key in RECALLS)
            + f" | {100 * quality[name]:.1f} | {100 * zs['top1']:.1f} |")
    return rows


def count_params(export_dir: Path) -> str:
    """Parameters of an exported model in millions, read from the safetensors header."""
    from safetensors import safe_open
    with safe_open(str(export_dir / "open_clip_model.safetensors"), "pt") as f:
        total = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return f"{total / 1e6:.1f}M"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (default runs/demo, runs/demo-quick with "
                        "--quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny version (about 2 minutes) that checks the plumbing; "
                             "its numbers mean nothing and its checks are not enforced")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo")).resolve()
    os.chdir(Path(__file__).resolve().parent.parent)  # configs/ paths are repository-relative
    demo = Demo(out, QUICK if args.quick else FULL, args.seed, enforce_checks=not args.quick)
    try:
        return demo()
    except StepFailed as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
