"""What each change to the live-teacher training step buys, measured in one process.

    python benchmarks/step_changes.py [--batch 32] [--iters 15] [--rounds 3] [--bf16]
    python benchmarks/step_changes.py --student TinyCLIP-ViT-40M-32-Text-19M --teacher ViT-B-32 \
        --batch 8 --iters 3 --rounds 2

Tiny-ViT-Student <- Tiny-ViT-Teacher by default (random weights), batch 32, captions like the
synthetic set's (13-15 of 32 token positions used; 13-15 of 77 with a 77-token model), one
thread, CPU time per call (time.process_time), median over `iters` calls after 3 warm-up calls,
the variants of each part interleaved for `rounds` rounds so that a neighbour's load hits all of
them alike. Parts:

- teacher forward: open_clip's full encode vs `training.text_prefix.encode_used_tokens`
  (the causal text tower on the batch's used tokens), in fp32, and with `--bf16`
  in bf16 too (model.teacher_dtype);
- student forward + backward (the task module, a contrastive loss): open_clip's full encode vs
  the task's forward with the loader's used length (the same text_prefix path);
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
from training.data.loader import text_length  # noqa: E402
from training.specs import build_student, build_teacher, model_spec  # noqa: E402
from training.task import DistillationTask  # noqa: E402
from training.text_prefix import encode_used_tokens  # noqa: E402

CAPTIONS = ["two small red circles at the top left of a white picture",
            "a big blue square in the middle of a white picture",
            "three green triangles at the bottom right of a white picture",
            "one yellow star on the left of a white picture"]


def cpu_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def inputs(name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Images at the model's size, its captions' ids and their used length (the loader's)."""
    spec = model_spec(name)
    texts = spec.tokenizer((CAPTIONS * batch)[:batch])
    size = spec.image_size if isinstance(spec.image_size, tuple) else (spec.image_size,) * 2
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    return images, texts, text_length(texts, spec.tokenizer)


def teacher_variants(name: str, batch: int, dtypes: tuple[str, ...]) -> dict:
    images, texts, _ = inputs(name, batch)
    variants = {}
    for dtype in dtypes:
        teacher, _ = build_teacher(name, dtype=dtype)
        used_tokens = lambda model, i, t: encode_used_tokens(model, None, i, t)  # noqa: E731
        for label, encode in (("full", models.encode), ("used tokens", used_tokens)):
            def run(teacher=teacher, encode=encode):
                with torch.no_grad():
                    encode(teacher, images, texts)
            variants[f"teacher forward {dtype}, {label}"] = run
    return variants


def student_variants(task: DistillationTask, name: str, batch: int) -> dict:
    images, texts, length = inputs(name, batch)

    def step(forward):
        out = forward()
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        task.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(logits, torch.arange(batch)).backward()
    return {"student fwd+bwd, full": lambda: step(lambda: models.encode(task.student, images, texts)),
            "student fwd+bwd, used tokens": lambda: step(lambda: task(images, texts,
                                                                      text_length=length))}


def adamw_variants(task: DistillationTask) -> dict:
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
    parser.add_argument("--student", default="Tiny-ViT-Student")
    parser.add_argument("--teacher", default="Tiny-ViT-Teacher")
    parser.add_argument("--bf16", action="store_true", help="also the bf16 teacher")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models.register_model_configs()
    task = models.make_deepspeed_safe(DistillationTask(build_student(args.student)[0]))
    variants = {**teacher_variants(args.teacher, args.batch, ("fp32", "bf16") if args.bf16
                                   else ("fp32",)),
                **student_variants(task, args.student, args.batch), **adamw_variants(task)}
    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            results[name].append(cpu_ms(fn, args.iters))
    print(f"{args.student} <- {args.teacher}, batch {args.batch}, 1 thread, CPU ms per call "
          f"(median of {args.iters}), "
          f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}")
    for name, values in results.items():
        print(f"  {name:34s} {statistics.median(values):8.1f} ms  "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
