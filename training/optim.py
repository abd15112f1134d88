"""The optimizer's parameter groups and the learning-rate schedule.

AdamW (torch's own, handed to DeepSpeed as the client optimizer: nothing to compile) with two
groups, as CLIP/OpenCLIP/TinyCLIP train: weight decay on matrices only, none on gains, biases,
norms, 1-D embeddings (class embedding) and the logit scale. The schedule is a linear warm-up then
a cosine to `min_lr`, as a torch LambdaLR: one closed-form function of the step, so its whole
state is the step counter and a resumed run continues it exactly (a SequentialLR of chained
schedulers recomputes the rate recursively and needs an awkward milestone when warm-up is 0).
"""
from __future__ import annotations

import functools
import math
from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from training.config import OptimConfig

# Substrings of parameter names that never get weight decay (open_clip's rule, plus biases).
_NO_DECAY_NAME_PARTS = ("bias", "ln_", ".ln", "bn", "norm", "logit_scale")


def wants_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Matrices (ndim >= 2) decay; gains, biases, norms and the logit scale do not."""
    if param.ndim < 2:
        return False
    return not any(part in name for part in _NO_DECAY_NAME_PARTS)


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                 weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters (frozen ones stay out of the optimizer)."""
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            (decay if wants_weight_decay(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model.named_parameters(), cfg.weight_decay),
                             lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int,
                         min_ratio: float) -> float:
    """LR multiplier at `step`: linear 1/w..1 over the warm-up, then cosine from 1 to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> LambdaLR:
    factor = functools.partial(warmup_cosine_factor, warmup_steps=cfg.warmup_steps,
                               total_steps=total_steps, min_ratio=cfg.min_lr / cfg.lr)
    return LambdaLR(optimizer, factor)
