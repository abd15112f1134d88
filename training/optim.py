"""The optimizer and the learning-rate schedule.

AdamW (torch's own, handed to DeepSpeed as the client optimizer: nothing to compile) over the
task's parameter groups (training/task.py: weight decay on matrices only, as CLIP/OpenCLIP/
TinyCLIP train, plus any group a part declares, e.g. a masked student's gates at a constant rate).
Groups named in `optim.param_groups` (parameter-name globs: e.g. the heads at 1e-3, the
encoders at optim.lr) get their own base rate and weight decay; the schedule scales each group's
own base rate by the same factor (a group at lr x ends at x * min_lr / lr).
The schedule is a linear warm-up then a cosine to `min_lr`, as a torch LambdaLR: one closed-form
function of the step, so its whole state is the step counter and a resumed run continues it
exactly (a SequentialLR of chained schedulers recomputes the rate recursively and needs an awkward
milestone when warm-up is 0). Groups with "schedule": "constant" keep their rate.
"""
from __future__ import annotations

import fnmatch
import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from training.config import ConfigError, OptimConfig

SCHEDULES = ("model", "constant")


def named_param_groups(task, cfg: OptimConfig) -> list[dict]:
    """optim.param_groups resolved over the task's trainable parameter names: each parameter
    joins the first group with a matching glob (fnmatch). A glob that matches no trainable
    parameter is a one-line ConfigError naming optim.param_groups.<i>.match (before training)."""
    trainable = [name for name, p in task.named_parameters() if p.requires_grad]
    taken: set[str] = set()
    groups = []
    for i, group in enumerate(cfg.param_groups):
        for glob in group.match:
            if not any(fnmatch.fnmatchcase(name, glob) for name in trainable):
                raise ConfigError(
                    f"key optim.param_groups.{i}.match: {glob!r} matches no trainable parameter "
                    f"of the task (names look like {', '.join(trainable[:2])}, ...)")
        names = [name for name in trainable if name not in taken
                 and any(fnmatch.fnmatchcase(name, glob) for glob in group.match)]
        taken.update(names)
        groups.append({"name": group.name, "names": names, "lr": group.lr,
                       "weight_decay": group.weight_decay})
    return groups


# Devices with torch's fused AdamW kernel (one pass over each tensor for the whole update).
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(task, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `task.param_groups` (a DistillationTask), with optim.param_groups' own rates:
    torch's fused kernel where every parameter is a float tensor on a device that has it, else
    the multi-tensor (foreach) update.

    Tiny student on one CPU thread (docs/benchmarks.md): fused 2.8 ms per step, foreach 10.5 ms,
    the default for-loop 27 ms; most of it is the 49408-row token embedding, which a batch barely
    touches but AdamW (weight decay, moments) updates densely. Same update up to float rounding."""
    groups = task.param_groups(cfg.weight_decay, named_param_groups(task, cfg))
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES
                                 for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int,
                         min_ratio: float) -> float:
    """LR multiplier at `step`: linear 1/w..1 over the warm-up, then cosine from 1 to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_factor(step: int) -> float:
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> LambdaLR:
    """Warm-up + cosine for the "model" groups; "constant" groups keep their rate."""
    factor = functools.partial(warmup_cosine_factor, warmup_steps=cfg.warmup_steps,
                               total_steps=total_steps, min_ratio=cfg.min_lr / cfg.lr)
    factors = [constant_factor if group.get("schedule") == "constant" else factor
               for group in optimizer.param_groups]
    return LambdaLR(optimizer, factors)


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's hyperparameters (weight decay, betas, eps, rate, ...)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def restore_group_settings(optimizer: torch.optim.Optimizer, settings: list[dict]) -> None:
    """After a resume: this run's hyperparameters per group, and one step counter per state.

    DeepSpeed 0.19.7's universal load at ZeRO-3 copies group 0's hyperparameters onto every
    group (weight decay on the no-decay group), and gives every group's state the very same
    `step` tensor, which AdamW then increments once per group per step (a wrong bias
    correction from the first resumed step on)."""
    for group, saved in zip(optimizer.param_groups, settings):
        group.update(saved)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def continue_schedule(scheduler: LambdaLR, base_lrs: list[float]) -> None:
    """After a resume: this run's schedule (its base rates and total steps) at the restored step.

    A checkpoint restores the step counter, the base rates and the last rate. The last rate is
    the OLD schedule's (0 at the end of a finished run whose total_steps was then raised), and
    the base rates are the old config's: set both from this run's config, so the first resumed
    step already runs at this run's rate for its step (a continuous schedule, no zero-lr step).
    """
    scheduler.base_lrs = list(base_lrs)
    step = scheduler.last_epoch
    rates = [base * factor(step) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (torch keeps it in this attribute)
