"""Temperature-aware knowledge distillation (TinyCLIP-ConvFFN): row- and column-wise KL between
the teacher's and the student's similarity matrices, at the term's own temperature.

    P_T = softmax(T_img @ T_txt^T / tau),    P_S = softmax(S_img @ S_txt^T / tau_S)
    loss = 1/2 [ KL_rows(P_T || P_S) + KL_cols(P_T^T || P_S^T) ]

rows: image -> text over the gathered texts; columns: text -> image over the gathered images.
`temperature` (tau) is a number or a schedule over steps (training/objectives/schedules.py); it
is independent of the models' logit scales. `learned: true` gives the student's side a learned
temperature tau_S (a TemperatureHead in the task module, initialised at the schedule's first
value, checkpointed with the weights) while the teacher's side stays at the schedule: learning
one temperature for both sides would let the KL fall to 0 by flattening both distributions.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from training.objectives.base import (LossTerm, TermInputs, TermModels, kl_divergence,
                                      register_term)
from training.objectives.schedules import parse_schedule
from training.task import TaskHead

HEAD = "tempkd_temperature"


class TemperatureHead(TaskHead):
    """A learned temperature: adds `tempkd_log_temperature` (a [1] tensor, shared by the batch)
    to the student's outputs (the term logs it as tempkd_temperature)."""

    def __init__(self, initial: float):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor([math.log(initial)]))

    def forward(self, outputs):
        return {"tempkd_log_temperature": self.log_temperature.clone()}  # ZeRO-3 releases params


@register_term
class TempKDTerm(LossTerm):
    name = "tempkd"
    needs_teacher = True
    single_teacher = True

    def __init__(self, temperature=0.05, learned: bool = False):
        super().__init__()
        self.temperature = parse_schedule(temperature, minimum=None)
        if self.temperature.always_zero() or self.temperature(0) <= 0 or \
                not all(self.temperature(s) > 0 for s in (0, 10**12)):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not isinstance(learned, bool):
            raise ValueError(f"learned must be true or false, got {learned!r}")
        self.learned = learned
        self.student_keys = ("tempkd_log_temperature",) if learned else ()

    def task_heads(self, models: TermModels) -> dict:
        return {HEAD: TemperatureHead(self.temperature(0))} if self.learned else {}

    def student_scale(self, inputs: TermInputs):
        """1 / the student side's temperature: the learned one, else the schedule's."""
        if self.learned:
            return torch.exp(-inputs.student["tempkd_log_temperature"].float().reshape(()))
        return 1.0 / self.temperature(inputs.step)

    def scales(self, inputs: TermInputs) -> dict[str, torch.Tensor]:
        return {"tempkd_temperature": 1.0 / torch.as_tensor(self.student_scale(inputs)).float()}

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        tau = self.temperature(inputs.step)
        student_scale = self.student_scale(inputs)
        inputs.single_teacher(self.name)
        teacher = inputs.teacher_logits(0, scale=1.0 / tau)
        student = inputs.student_logits(scale=student_scale)
        return sum(kl_divergence(s, t.softmax(dim=-1)) for s, t in zip(student, teacher)) / 2
