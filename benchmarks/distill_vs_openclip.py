"""Distillation steps/s: this project's trainer against OpenCLIP's own trainer, same run.

    python benchmarks/distill_vs_openclip.py                       # batch 32, 40 steps, 3 pairs
    python benchmarks/distill_vs_openclip.py --steps 60 --warmup 10 --repeats 5 --threads 1
    python benchmarks/distill_vs_openclip.py --student TinyCLIP-ViT-40M-32-Text-19M --teacher ViT-B-32 \
        --batch 8 --steps 10 --warmup 3 --repeats 1

Both trainers distil Tiny-ViT-Student from Tiny-ViT-Teacher (configs/models; `--student` /
`--teacher` for another pair; the teacher has random weights saved to a local .pt file: speed
does not depend on the weights) on the same
synthetic 64 px shards, in one process on the CPU, fp32, the same batch, the same number of
steps, the same torch thread count (OMP_NUM_THREADS) and one loader worker each. The two run as
subprocesses, alternating (ours, OpenCLIP's, ours, ...), so they share the machine's load.

Time per step comes from each trainer's own log with one record per step, so start-up (imports,
model build, DeepSpeed init, the first loader fill) and the end (checkpoint, export) are left
out: ours `metrics.jsonl` `step_time_s` (time since the previous step ended); OpenCLIP's
`Batch (t)` in out.log (the same definition). The first `--warmup` steps are dropped; the median
of the rest is reported, and the ratio per adjacent pair. `--clock cpu` (the default) makes both
step timers read the training process's CPU time instead of wall time (see `child`): on a
shared machine wall time per step swings 2x with the neighbours' load, CPU time barely.

Made equal: loss terms (ours `affinity_weight=1, clip_weight=1`, learned student scale and the
teacher's own, which is OpenCLIP's contrastive + distillation loss), AdamW hyper-parameters,
warm-up + cosine, gradient clipping at 5. Not equal, by design: ours runs the student inside a
DeepSpeed engine (ZeRO stage `--zero-stage`), its loader makes a separate teacher view (here the
same tensor), validates each sample and counts skips; OpenCLIP wraps nothing on one process
(no DDP), clamps the logit scale after each step, and feeds the student's image to the teacher.

Where ours spends a step: benchmarks/mfu.py's `Step.timed` (the same models, loader, loss and
AdamW, without the DeepSpeed engine) in this process, same threads, after the pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDENT, TEACHER = "Tiny-ViT-Student", "Tiny-ViT-Teacher"
MODEL_CONFIGS = ROOT / "configs" / "models"
OPTIM = {"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6,
         "warmup": 5, "grad_clip": 5.0}
OPENCLIP_STEP = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)")


# ---- inputs shared by both trainers --------------------------------------------------------
def prepare(tmp: Path, samples: int, teacher_name: str = TEACHER) -> dict:
    """Synthetic train shards (exactly `samples`) and a random teacher state dict (.pt)."""
    import open_clip
    import torch
    from tests.helpers.shards import make_synthetic_shards

    shards = make_synthetic_shards(tmp / "shards", train=samples, val=0, zeroshot=0,
                                   samples_per_shard=128, image_size=64)
    open_clip.add_model_config(str(MODEL_CONFIGS))
    teacher = open_clip.create_model(teacher_name)
    torch.save(teacher.state_dict(), tmp / "teacher.pt")
    return {"train": shards["train_shards"], "count": shards["train_count"],
            "teacher": str(tmp / "teacher.pt")}


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    for launcher_var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(launcher_var, None)
    return env


def run_logged(cmd: list[str], env: dict, log_file: Path) -> None:
    """Run a trainer; on failure, one line naming it plus the tail of its output."""
    with open(log_file, "w") as out:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"{' '.join(cmd[2:5])} exited {proc.returncode} (log {log_file}):\n{tail}")


# ---- ours ----------------------------------------------------------------------------------
def run_ours(inputs: dict, run_dir: Path, args, extra: dict | None = None
             ) -> list[tuple[float, float]]:
    """`python -m training` on configs/tiny-distill.yaml (+ `extra` overrides); (data wait,
    step time) per step."""
    overrides = {
        "run_dir": run_dir, "data.train": inputs["train"], "data.batch_size": args.batch,
        "model.student": getattr(args, "student", STUDENT),  # (callers without the options)
        "model.teacher": getattr(args, "teacher", TEACHER),
        "data.workers": args.workers, "data.shuffle_buffer": 0,
        "model.teacher_pretrained": inputs["teacher"],
        "loss.affinity_weight": 1.0, "loss.clip_weight": 1.0, "loss.fixed_logit_scale": "null",
        "optim.lr": OPTIM["lr"], "optim.weight_decay": OPTIM["weight_decay"],
        "optim.betas": f"[{OPTIM['beta1']},{OPTIM['beta2']}]", "optim.eps": OPTIM["eps"],
        "optim.warmup_steps": OPTIM["warmup"], "optim.grad_clip": OPTIM["grad_clip"],
        "optim.epochs": "null", "optim.total_steps": args.steps,
        "deepspeed.zero_stage": args.zero_stage, "deepspeed.precision": "fp32",
        "checkpoint.every_steps": 0, "checkpoint.resume": "null",
        "checkpoint.export_at_end": "false", "log.every_steps": 1, "log.tensorboard": "false",
        "log.wandb": "disabled", **(extra or {}),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "ours", args.clock,
           "--config", "configs/tiny-distill.yaml", *(f"{k}={v}" for k, v in overrides.items())]
    run_dir.mkdir(parents=True)
    run_logged(cmd, child_env(args.threads), run_dir.parent / f"{run_dir.name}.log")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["data_wait_s"], r["step_time_s"]) for r in records if "step_time_s" in r]
    return steps


# ---- OpenCLIP's ----------------------------------------------------------------------------
def run_openclip(inputs: dict, logs: Path, args) -> list[tuple[float, float]]:
    """`open_clip_train.main` with --distill-model; (Data (t), Batch (t)) per step."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "open_clip", args.clock,
           "--dataset-type", "webdataset", "--train-data", inputs["train"],
           "--train-num-samples", str(args.steps * args.batch), "--batch-size", str(args.batch),
           "--workers", str(args.workers), "--epochs", "1",
           "--model", args.student, "--distill-model", args.teacher,
           "--distill-pretrained", inputs["teacher"],
           *getattr(args, "openclip_device_args", ["--device", "cpu", "--precision", "fp32"]),
           "--lr", str(OPTIM["lr"]), "--wd", str(OPTIM["weight_decay"]),
           "--beta1", str(OPTIM["beta1"]), "--beta2", str(OPTIM["beta2"]), "--eps", str(OPTIM["eps"]),
           "--warmup", str(OPTIM["warmup"]), "--grad-clip-norm", str(OPTIM["grad_clip"]),
           "--log-every-n-steps", "1", "--save-frequency", "0", "--report-to", "",
           "--logs", str(logs), "--name", "run", "--seed", "0"]
    logs.mkdir(parents=True)
    run_logged(cmd, child_env(args.threads), logs / "console.log")
    text = (logs / "run" / "out.log").read_text()
    return [(float(d), float(b)) for d, b in OPENCLIP_STEP.findall(text)]


def openclip_child(argv: list[str]) -> None:
    """OpenCLIP's trainer, unmodified, with our model configs registered."""
    import open_clip
    from open_clip_train.main import main as openclip_main

    open_clip.add_model_config(str(MODEL_CONFIGS))
    openclip_main(argv)


def ours_child(argv: list[str]) -> None:
    from training.cli import main as ours_main

    if ours_main(argv) != 0:
        raise SystemExit(1)


def cpu_clock():
    """A stand-in for a module's `time`: both clock calls read this process's CPU time."""
    import types

    return types.SimpleNamespace(perf_counter=time.process_time, time=time.process_time)


def child(which: str, clock: str, argv: list[str]) -> None:
    """Run one trainer; with clock "cpu" its step timer reads this process's CPU time.

    Each trainer times a step with one clock call in one module (ours training/metrics.py:
    time.perf_counter, OpenCLIP's open_clip_train/train.py: time.time); pointing that module's
    `time` at time.process_time makes its logged step time the CPU seconds the training process
    spent on the step (all its threads; not the loader worker's), which other processes on a
    shared machine barely change, while wall time doubles whenever a neighbour takes the core.
    """
    if clock == "cpu":
        if which == "ours":
            import training.metrics
            training.metrics.time = cpu_clock()
        else:
            import open_clip_train.train
            open_clip_train.train.time = cpu_clock()
    (ours_child if which == "ours" else openclip_child)(argv)


# ---- where ours spends a step (benchmarks/mfu.py) ------------------------------------------
def breakdown(args, tmp: Path) -> dict[str, float]:
    import torch
    import benchmarks.mfu
    from benchmarks.mfu import PHASES, Case, Step

    if args.clock == "cpu":
        benchmarks.mfu.time = cpu_clock()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    step = Step(Case(args.student, args.teacher, args.batch), args.batch, torch.device("cpu"), "fp32",
                tmp / "mfu")
    for _ in range(args.warmup):
        step.timed()
    samples = [step.timed() for _ in range(args.breakdown_steps)]
    return {p: statistics.median(s[p] for s in samples) for p in PHASES}


# ---- report --------------------------------------------------------------------------------
def summarise(steps: list[tuple[float, float]], warmup: int, expected: int, name: str) -> dict:
    if len(steps) != expected:
        raise SystemExit(f"{name}: {len(steps)} step records in its log, expected {expected}")
    kept = steps[warmup:]
    step_s = statistics.median(s for _, s in kept)
    return {"step_s": step_s, "best_step_s": min(s for _, s in kept),
            "data_s": statistics.median(d for d, _ in kept), "step_times_s": [s for _, s in kept]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="steps per run (one epoch)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out")
    parser.add_argument("--repeats", type=int, default=3, help="pairs (ours, OpenCLIP's)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both")
    parser.add_argument("--workers", type=int, default=1, help="loader workers of both")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what the trainers' step timers read (see child())")
    parser.add_argument("--breakdown-steps", type=int, default=10)
    parser.add_argument("--student", default=STUDENT, help="a model name of configs/models")
    parser.add_argument("--teacher", default=TEACHER, help="(random weights, saved to a .pt)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="distill_vs_openclip-") as tmp_name:
        tmp = Path(tmp_name)
        inputs = prepare(tmp, args.steps * args.batch, args.teacher)
        runs = {"ours": [], "open_clip": []}
        for i in range(args.repeats):
            for name, run in (("ours", run_ours), ("open_clip", run_openclip)):
                steps = run(inputs, tmp / f"{name}-{i}", args)
                runs[name].append(summarise(steps, args.warmup, args.steps, name))
                load.append(os.getloadavg()[0])
                print(f"  pair {i + 1} {name:9s} {runs[name][-1]['step_s'] * 1e3:7.1f} ms/step "
                      f"(load {load[-1]:.1f})", flush=True)
        phases = breakdown(args, tmp)
    load.append(os.getloadavg()[0])
    print(report(runs, phases, load, args))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "runs": runs, "breakdown_s": phases, "load": load}, indent=2))
    return 0


def report(runs: dict, phases: dict, load: list[float], args) -> str:
    def med(name):
        return statistics.median(r["step_s"] for r in runs[name])
    ratios = [o["step_s"] / u["step_s"] for u, o in zip(runs["ours"], runs["open_clip"])]
    lines = [f"batch {args.batch}, {args.steps} steps per run (first {args.warmup} left out), "
             f"{args.repeats} pairs, {args.clock} time, fp32, {args.student} <- {args.teacher}, "
             f"{args.threads} thread(s), {args.workers} loader "
             f"worker(s), ours at ZeRO-{args.zero_stage}; load average "
             f"{min(load):.1f}-{max(load):.1f}"]
    for name in ("ours", "open_clip"):
        per_run = ", ".join(f"{r['step_s'] * 1e3:.0f}" for r in runs[name])
        data = statistics.median(r["data_s"] for r in runs[name])
        best = min(r["best_step_s"] for r in runs[name])
        lines.append(f"  {name:9s} {med(name) * 1e3:6.0f} ms/step  {args.batch / med(name):6.1f} "
                     f"samples/s  data wait {data * 1e3:.0f} ms  fastest step {best * 1e3:.0f} ms  "
                     f"(runs: {per_run})")
    lines.append(f"  ratio ours / open_clip steps/s: {statistics.median(ratios):.2f} "
                 f"(per pair: {', '.join(f'{r:.2f}' for r in ratios)})")
    total = sum(phases.values())
    lines.append(f"  ours without DeepSpeed (benchmarks/mfu.py Step, affinity loss), "
                 f"{total * 1e3:.0f} ms/step: " +
                 ", ".join(f"{p} {1e3 * s:.0f} ms ({100 * s / total:.0f}%)"
                           for p, s in phases.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
