"""Hard-concrete (L0) gates and the Lagrangian sparsity constraint (TinyCLIP / CoFi style).

A gate z in [0, 1] per prunable unit (Louizos et al., "Learning Sparse Neural Networks through
L0 Regularization", 2018): in training z is sampled from a stretched, clamped concrete
distribution with a learned location log_alpha; in eval it is deterministic. Its probability of
being non-zero is differentiable, which gives a differentiable expected parameter count.

Constants are TinyCLIP's: stretch limits (-0.1, 1.1), temperature 2/3, log_alpha initialised to
10 and clamped to [ln 0.01, ln 100] (clamp() is called before every forward, i.e. after every
optimizer step, so no trainer hook is needed).

Hand-written rather than a library: torch.distributions has no hard-concrete, and the few
lines below are the whole method.
"""
from __future__ import annotations

import math

import torch
from torch import nn

LIMIT_L, LIMIT_R = -0.1, 1.1
TEMPERATURE = 2.0 / 3.0
LOG_ALPHA_INIT = 10.0
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
_EPS = 1e-6


class HardConcreteGate(nn.Module):
    """Gates of any shape (e.g. (layers, heads)); forward() returns z of that shape."""

    def __init__(self, *shape: int, init: float = LOG_ALPHA_INIT):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, float(init)))

    @torch.no_grad()
    def clamp(self) -> None:
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) per gate: 1 - CDF of the stretched concrete at 0 (the expected L0)."""
        return torch.sigmoid(self.log_alpha - TEMPERATURE * math.log(-LIMIT_L / LIMIT_R))

    def deterministic(self) -> torch.Tensor:
        """The eval-mode gate: the stretched sigmoid of log_alpha, clamped to [0, 1]."""
        s = torch.sigmoid(self.log_alpha)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(_EPS, 1 - _EPS)
        s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / TEMPERATURE)
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
