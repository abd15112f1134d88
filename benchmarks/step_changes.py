"""What each change to the live-teacher training step buys, measured in one process.

    python benchmarks/step_changes.py [--batch 32] [--iters 15] [--rounds 3]

Tiny-ViT-Student <- Tiny-ViT-Teacher (random weights), batch 32, the synthetic set's captions
(13-15 of 32 token positions used), one thread, CPU time per call (time.process_time), median
over `iters` calls after 3 warm-up calls, the variants of each part interleaved for `rounds`
rounds so that a neighbour's load hits all of them alike. Parts:

- teacher forward: open_clip's full encode vs `training.teachers.encode_frozen` (the causal
  text tower on the batch's used tokens), in fp32, and in bf16 (model.teacher_dtype);
- AdamW over the task's groups (49408-row token embedding included): torch's for-loop (what
  OpenCLIP's trainer gets on the CPU), foreach, fused (training/optim.py).

The whole step against OpenCLIP's is benchmarks/distill_vs_openclip.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import models  # noqa: E402
from training.specs import build_student, build_teacher, model_spec  # noqa: E402
from training.task import DistillationTask  # noqa: E402
from training.teachers import encode_frozen  # noqa: E402

CAPTIONS = ["two small red circles at the top left", "a big blue square in the middle",
            "three green triangles at the bottom right", "one yellow star on the left"]


def cpu_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def teacher_variants(batch: int) -> dict:
    texts = model_spec("Tiny-ViT-Teacher").tokenizer((CAPTIONS * batch)[:batch])
    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    variants = {}
    for dtype in ("fp32", "bf16"):
        teacher, _ = build_teacher("Tiny-ViT-Teacher", dtype=dtype)
        for name, encode in (("full", models.encode), ("used tokens", encode_frozen)):
            def run(teacher=teacher, encode=encode):
                with torch.no_grad():
                    encode(teacher, images, texts)
            variants[f"teacher forward {dtype}, {name}"] = run
    return variants


def adamw_variants() -> dict:
    task = models.make_deepspeed_safe(DistillationTask(build_student("Tiny-ViT-Student")[0]))
    for param in task.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    groups = task.param_groups(0.1)
    variants = {}
    for name, kwargs in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
                         ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW([dict(g) for g in groups], lr=1e-3, betas=(0.9, 0.98),
                                      eps=1e-6, **kwargs)
        variants[f"AdamW {name}"] = optimizer.step
    return variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models.register_model_configs()
    variants = {**teacher_variants(args.batch), **adamw_variants()}
    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            results[name].append(cpu_ms(fn, args.iters))
    print(f"batch {args.batch}, 1 thread, CPU ms per call (median of {args.iters}), "
          f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}")
    for name, values in results.items():
        print(f"  {name:34s} {statistics.median(values):7.1f} ms  "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
