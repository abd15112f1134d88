"""Shared test code for the trainer: tiny run overrides, metrics reading, a probe batch.

    overrides = tiny_overrides(shards["train_shards"], run_dir, steps=6)
    cfg = load_config("configs/tiny-distill.yaml", overrides + ["deepspeed.zero_stage=2"])
    losses = step_losses(run_dir)            # {step: loss} from metrics.jsonl (last record wins)
    pairs = optimizer_gradients(trainer, micro_batches)  # (param, grad) the optimizer's step sees
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_DISTILL = str(REPO_ROOT / "configs" / "tiny-distill.yaml")
TINY_CLIP = str(REPO_ROOT / "configs" / "tiny-clip.yaml")


def tiny_overrides(train_shards: str, run_dir, steps: int, batch_size: int = 8) -> list[str]:
    """A few fp32 steps of the tiny recipes, logging every step, nothing slow switched on."""
    return [
        f"data.train={train_shards}", f"run_dir={run_dir}", f"data.batch_size={batch_size}",
        "data.workers=0", "data.shuffle_buffer=50", "model.teacher_pretrained=null",
        "model.student_init=null",  # the recipes' `teacher` init needs teacher weights
        "optim.epochs=null", f"optim.total_steps={steps}", "optim.warmup_steps=0",
        "optim.lr=5e-4", "log.every_steps=1", "log.tensorboard=false", "checkpoint.resume=null",
        "checkpoint.every_steps=0", "deepspeed.dist_timeout_s=120",
    ]


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(run_dir, key: str = "loss") -> dict[int, float]:
    """Per-step training loss; a step logged twice (re-run after a resume) keeps the last."""
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def probe_batch(image_size: int = 64, context_length: int = 32, n: int = 4) -> tuple:
    """Fixed inputs (no data pipeline) to compare a model's outputs in two places."""
    generator = torch.Generator().manual_seed(1234)
    images = torch.randn(n, 3, image_size, image_size, generator=generator)
    texts = torch.randint(1, 1000, (n, context_length), generator=generator)
    texts[:, -1] = 49407  # an end-of-text token: open_clip pools at the argmax token
    return images, texts


def optimizer_gradients(trainer, micro_batches: list[dict]) -> list[tuple]:
    """(parameter, gradient) pairs the optimizer sees at the trainer's next step (an optimizer
    step pre-hook around `trainer.train_step`; ZeRO 1-2 show their flat fp32 partitions)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    pairs = []

    def capture(optimizer, _args, _kwargs):
        pairs.extend((p, p.grad.detach().float().clone()) for group in optimizer.param_groups
                     for p in group["params"] if p.grad is not None)

    handle = register_optimizer_step_pre_hook(capture)
    try:
        trainer.train_step(micro_batches)
    finally:
        handle.remove()
    return pairs
