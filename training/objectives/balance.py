"""Automatic balancing across the active terms (`loss.balance`).

    none:        total = sum_i w_i(step) L_i
    uncertainty: total = sum_i w_i(step) (exp(-s_i) L_i + s_i)       (Kendall, Gal & Cipolla,
                 CVPR 2018: s_i = log sigma_i^2, one learned log-variance per term; a task head,
                 UncertaintyWeights, so s is optimised, checkpointed and partitioned with the
                 student's weights)
    loss_ratio:  total = sum_i w_i(step) L_i / L_i(first)            (each term relative to its
                 value at the first step it was weighted, averaged over ranks: every term starts
                 at w_i and falls as fast as it is learned; the references are a CheckpointPart)

Every balancer returns the total and each term's effective weight (logged as weight_<name>).
The scheduled weights w_i(step) (training/objectives/schedules.py) multiply every form, so a
term switched off by its schedule contributes nothing (and its s_i gets no gradient).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from training.distributed import is_distributed
from training.task import TaskHead

BALANCE_MODES = ("none", "uncertainty", "loss_ratio")
LOG_VARS = "balance_log_vars"


class Balancer:
    """sum_i w_i L_i (no balancing)."""

    def task_heads(self) -> dict[str, nn.Module]:
        return {}

    def checkpoint_parts(self) -> dict:
        return {}

    def combine(self, values: dict[str, torch.Tensor], weights: dict[str, float], student: dict
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total with graph, {name: effective weight}) for this step."""
        factors = {name: torch.tensor(w, device=values[name].device) for name, w in weights.items()}
        return sum(factors[name] * values[name] for name in values), factors


class UncertaintyWeights(TaskHead):
    """The learned log-variances s_i of uncertainty weighting, one per term (in config order).
    Adds `balance_log_vars` ([terms], shared by the batch) to the student's outputs."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.log_vars = nn.Parameter(torch.zeros(len(names)))

    def forward(self, outputs):
        return {LOG_VARS: self.log_vars.clone()}  # a new tensor: ZeRO-3 releases the parameter


class UncertaintyBalancer(Balancer):
    def __init__(self, names: list[str]):
        self.names = list(names)

    def task_heads(self) -> dict[str, nn.Module]:
        return {"balance": UncertaintyWeights(self.names)}

    def combine(self, values, weights, student):
        log_vars = student[LOG_VARS].float().reshape(-1)
        total, factors = 0.0, {}
        for i, name in enumerate(self.names):
            w = weights[name]
            total = total + w * (torch.exp(-log_vars[i]) * values[name] + log_vars[i])
            factors[name] = (w * torch.exp(-log_vars[i])).detach()
        return total, factors


class LossRatioBalancer(Balancer):
    """Each term divided by its (rank-averaged) value at the first step it was weighted; the
    references are checkpointed (`loss_balance`), so a resumed run divides by the same."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.reference: dict[str, float] = {}

    def checkpoint_parts(self) -> dict:
        return {"loss_balance": self}

    def state_dict(self) -> dict:
        return {"reference": dict(self.reference)}

    def load_state_dict(self, state: dict) -> None:
        self.reference = {k: float(v) for k, v in state["reference"].items()}

    def combine(self, values, weights, student):
        new = [name for name in self.names if weights[name] != 0 and name not in self.reference]
        if new:  # the same on every rank: the weights are a function of the step
            first = torch.stack([values[name].detach().float() for name in new])
            if is_distributed():
                dist.all_reduce(first)
                first /= dist.get_world_size()
            self.reference.update({name: max(float(v), 1e-12) for name, v in zip(new, first)})
        factors = {name: torch.tensor(w / self.reference.get(name, 1.0),
                                      device=values[name].device) for name, w in weights.items()}
        return sum(factors[name] * values[name] for name in values), factors


def build_balancer(mode: str, names: list[str]) -> Balancer:
    if mode == "uncertainty":
        return UncertaintyBalancer(names)
    if mode == "loss_ratio":
        return LossRatioBalancer(names)
    return Balancer()
