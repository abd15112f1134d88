"""Distillation from stored teacher embeddings vs the live teacher vs OpenCLIP's --distill-model,
and what `clip-data embed` costs: one run, side by side.

    python benchmarks/stored_embeddings.py                      # batch 32, 40 steps, 2 rounds
    python benchmarks/stored_embeddings.py --augmentations 5 --dtype fp16 --repeats 3

Same setup as benchmarks/distill_vs_openclip.py (whose runners this reuses): Tiny-ViT-Student
from Tiny-ViT-Teacher (random weights in a local .pt), synthetic 64 px shards, CPU, fp32, one
loader worker, OMP_NUM_THREADS=--threads, per-step times from each trainer's own log, CPU clock by
default. Each round runs, as subprocesses one after the other: ours with the live teacher, ours
from stored embeddings (model.teacher_source=shards), OpenCLIP's --distill-model.

Before the rounds `clip-data embed` stores N augmentations per image of the same shards (one
process, same threads); its throughput is samples (images, each with N crops and all captions)
per second of the embed process's CPU time (or wall time with --clock wall). Break-even: the
number of epochs after which embedding once costs less than running the live teacher each epoch,
embed_s_per_sample / (live_s_per_sample - stored_s_per_sample).
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

import benchmarks.distill_vs_openclip as peer  # noqa: E402
from benchmarks.distill_vs_openclip import child_env, prepare, run_openclip, run_ours, summarise  # noqa: E402

SET_NAME = "bench"
EMBED_LINE = re.compile(r"embedded (\d+) samples in ([0-9.]+) s .*process CPU ([0-9.]+) s")


def embed(inputs: dict, args, log: Path) -> dict:
    """Run clip-data embed once. Its throughput over the embedding loop (its own summary line:
    no start-up, imports or teacher loading), by the process's CPU time or wall time (--clock)."""
    cmd = [sys.executable, "-m", "data_tools", "embed", inputs["train"], "--name", SET_NAME,
           "--teacher", args.teacher, "--pretrained", inputs["teacher"], "--augmentations",
           str(args.augmentations), "--dtype", args.dtype, "--batch-size", str(args.embed_batch),
           "--device", args.device, "--precision", args.precision, "--no-progress"]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=child_env(args.threads), cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"clip-data embed exited {proc.returncode}:\n{log.read_text()[-2000:]}")
    found = EMBED_LINE.search(log.read_text())
    samples, wall, cpu = int(found[1]), float(found[2]), float(found[3])
    seconds = cpu if args.clock == "cpu" else wall
    return {"samples": samples, "seconds": seconds, "wall_s": wall, "cpu_s": cpu,
            "command_wall_s": total, "samples_per_s": samples / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="steps per run (one epoch)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--augmentations", type=int, default=5)
    parser.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: every run in bf16 (ours: DeepSpeed bf16 + bf16 teacher; "
                             "OpenCLIP: amp_bf16; embed: bf16 teacher), wall clock")
    parser.add_argument("--student", default=peer.STUDENT, help="a model name of configs/models")
    parser.add_argument("--teacher", default=peer.TEACHER, help="(random weights, saved to a .pt)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    models = {}
    args.precision = "fp32"
    if args.device == "cuda":
        args.clock, args.precision = "wall", "bf16"
        models.update({"deepspeed.precision": "bf16", "model.teacher_dtype": "bf16"})
        args.openclip_device_args = ["--device", "cuda", "--precision", "amp_bf16"]

    load = [os.getloadavg()[0]]
    stored = {"model.teacher_source": "shards", "model.teacher_embeddings": SET_NAME}
    arms = {"live": lambda i, d: run_ours(inputs, d, args, models),
            "stored": lambda i, d: run_ours(inputs, d, args, {**models, **stored}),
            "open_clip": lambda i, d: run_openclip(inputs, d, args)}
    with tempfile.TemporaryDirectory(prefix="stored_embeddings-") as tmp_name:
        tmp = Path(tmp_name)
        inputs = prepare(tmp, args.steps * args.batch, args.teacher)
        embedded = embed(inputs, args, tmp / "embed.log")
        print(f"  embed {embedded['samples_per_s']:.1f} samples/s ({args.augmentations} crops)",
              flush=True)
        runs = {name: [] for name in arms}
        for i in range(args.repeats):
            for name, run in arms.items():
                steps = run(i, tmp / f"{name}-{i}")
                runs[name].append(summarise(steps, args.warmup, args.steps, name))
                load.append(os.getloadavg()[0])
                print(f"  round {i + 1} {name:9s} {runs[name][-1]['step_s'] * 1e3:7.1f} ms/step "
                      f"(load {load[-1]:.1f})", flush=True)
    results = report(runs, embedded, load, args)
    print(results["text"])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs,
                                               "embed": embedded, "load": load,
                                               **{k: v for k, v in results.items() if k != "text"}},
                                              indent=2))
    return 0


def report(runs: dict, embedded: dict, load: list[float], args) -> dict:
    step = {name: statistics.median(r["step_s"] for r in rs) for name, rs in runs.items()}
    per_round = lambda a, b: [rb["step_s"] / ra["step_s"] for ra, rb in zip(runs[a], runs[b])]
    ratios = {"stored_vs_open_clip": per_round("stored", "open_clip"),
              "stored_vs_live": per_round("stored", "live"),
              "live_vs_open_clip": per_round("live", "open_clip")}
    saved = (step["live"] - step["stored"]) / args.batch  # seconds per sample per epoch
    break_even = (1 / embedded["samples_per_s"]) / saved if saved > 0 else float("inf")
    lines = [f"batch {args.batch}, {args.steps} steps per run (first {args.warmup} left out), "
             f"{args.repeats} rounds, {args.clock} time, {args.device} {args.precision}, "
             f"{args.student} <- {args.teacher}, {args.threads} thread(s), "
             f"{args.workers} loader worker(s), ours at ZeRO-{args.zero_stage}; load average "
             f"{min(load):.1f}-{max(load):.1f}"]
    for name in runs:
        per_run = ", ".join(f"{r['step_s'] * 1e3:.0f}" for r in runs[name])
        lines.append(f"  {name:9s} {step[name] * 1e3:6.0f} ms/step  {args.batch / step[name]:7.1f} "
                     f"samples/s  (runs: {per_run})")
    for name, values in ratios.items():
        lines.append(f"  {name:20s} {statistics.median(values):.2f}x steps/s "
                     f"(per round: {', '.join(f'{v:.2f}' for v in values)})")
    lines.append(f"  clip-data embed: {embedded['samples_per_s']:.1f} samples/s "
                 f"({args.augmentations} crops each, {args.dtype}; {embedded['samples']} samples "
                 f"in {embedded['seconds']:.1f} s); pays for itself after {break_even:.2f} epochs")
    return {"text": "\n".join(lines), "step_s": step,
            "ratios": {k: statistics.median(v) for k, v in ratios.items()},
            "break_even_epochs": break_even}


if __name__ == "__main__":
    sys.exit(main())
