"""Hard-concrete (L0) gates and the Lagrangian sparsity constraint (TinyCLIP / CoFi style).

A gate z in [0, 1] per prunable unit (Louizos et al., "Learning Sparse Neural Networks through
L0 Regularization", 2018): in training z is sampled from a stretched, clamped concrete
distribution with a learned location log_alpha; in eval it is deterministic. Its probability of
being non-zero is differentiable, which gives a differentiable expected parameter count.

Constants are TinyCLIP's: stretch limits (-0.1, 1.1), temperature 2/3, log_alpha kept in
[ln 0.01, ln 100] (clamp() is called before every forward, i.e. after every optimizer step, so
no trainer hook is needed). TinyCLIP initialises log_alpha to 10 and clamps it to ln 100 after
the first step; we start at ln 100, the same start. Why: under DeepSpeed ZeRO 1/2 the optimizer
steps an fp32 master copy that the in-place clamp never reaches, so a master starting at 10
would have to descend to 4.6 before any gate moved. For the same reason every use of log_alpha
goes through `bounded()`, a straight-through clamp: bounded values, unclamped gradients (a
master that drifted past a bound still feels the gradient that brings it back).

Hand-written rather than a library: torch.distributions has no hard-concrete, and the few
lines below are the whole method.
"""
from __future__ import annotations

import math

import torch
from torch import nn

LIMIT_L, LIMIT_R = -0.1, 1.1
TEMPERATURE = 2.0 / 3.0
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
LOG_ALPHA_INIT = LOG_ALPHA_MAX
_EPS = 1e-6


class HardConcreteGate(nn.Module):
    """Gates of any shape (e.g. (layers, heads)); forward() returns z of that shape."""

    def __init__(self, *shape: int, init: float = LOG_ALPHA_INIT):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, float(init)))

    @torch.no_grad()
    def clamp(self) -> None:
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def bounded(self) -> torch.Tensor:
        """log_alpha clamped to its range in value, with the identity's gradient."""
        la = self.log_alpha
        return la + (la.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX) - la).detach()

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) per gate: 1 - CDF of the stretched concrete at 0 (the expected L0)."""
        return torch.sigmoid(self.bounded() - TEMPERATURE * math.log(-LIMIT_L / LIMIT_R))

    def deterministic(self) -> torch.Tensor:
        """The eval-mode gate, CoFi's rule: in each row (last axis) the round(expected number of
        zeros) gates with the lowest log_alpha are 0 unless fully open, the others the stretched
        sigmoid of log_alpha clamped to [0, 1] (0 too when log_alpha < ln(0.1/1.1)).

        Why the count: the constraint drives P(z != 0), not log_alpha below the clamp point, so
        gates that fall together sit near log_alpha -1.6 at 50% expected sparsity, where the
        plain clamped sigmoid is still 0.1 > 0 and pruning would keep every unit.
        """
        la = self.bounded().detach()
        s = torch.sigmoid(la)
        z = (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)
        zeros = torch.round((1.0 - self.prob_nonzero()).sum(-1, keepdim=True))
        rank = la.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)  # 0 = lowest
        # A fully open gate (z = 1) is never dropped: at the clamp maximum P(z = 0) is still
        # 0.2%, which would otherwise cut ~4 of 2048 neurons from an untouched model.
        return torch.where((rank < zeros) & (z < 1.0), torch.zeros_like(z), z)

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(_EPS, 1 - _EPS)
        s = torch.sigmoid((u.log() - (1 - u).log() + self.bounded()) / TEMPERATURE)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic()


def _flip_sign(grad: torch.Tensor) -> torch.Tensor:
    return -grad


class LagrangianConstraint(nn.Module):
    """lambda1 * (t - s) + lambda2 * (t - s)^2, t = target sparsity, s = expected sparsity.

    The multipliers are ordinary parameters whose gradient is negated by a hook, so the same
    optimizer that minimises the loss over the model maximises it over them (gradient ascent;
    torch's AdamW rejects a negative learning rate). The target rises linearly from `start` to
    `target` over `warmup_steps`.
    """

    def __init__(self, target: float, start: float = 0.0, warmup_steps: int = 0):
        super().__init__()
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target sparsity {target} must be in [0, 1)")
        self.target, self.start, self.warmup_steps = target, start, warmup_steps
        self.lambdas = nn.Parameter(torch.zeros(2))
        self.lambdas.register_hook(_flip_sign)

    def target_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.target
        return self.start + (self.target - self.start) * min(1.0, step / self.warmup_steps)

    def forward(self, expected_sparsity: torch.Tensor, step: int) -> torch.Tensor:
        gap = self.target_at(step) - expected_sparsity
        return self.lambdas[0] * gap + self.lambdas[1] * gap * gap
