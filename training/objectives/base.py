"""The contract of one term of the distillation objective.

A term is one module in training/objectives/ that subclasses `LossTerm` and registers itself
with `@register_term`; the config names it under `loss.terms.<name>` with its weight and its own
options. Nothing else changes to add one (the trainer, the logs and the checkpoint take the
names from the registry and the config).

    @register_term
    class MyTerm(LossTerm):
        name = "my_term"
        needs_teacher = True
        def __init__(self, temperature: float = 1.0): ...
        def forward(self, inputs: TermInputs) -> torch.Tensor: ...   # unweighted fp32 scalar

Conventions every term keeps (training/objectives/__init__.py composes them):
- No trainable parameters: a trainable part (a projection, an alignment MLP) is a task head
  (training/task.py) that adds entries to the student's output dict, which the term reads.
- Local loss over gathered columns: each rank scores ITS rows against the columns of ALL ranks
  (`inputs.gathered`, with gradient) and returns the mean over its rows, so the mean over ranks
  is the full-batch loss and the engine's gradient average is the full-batch gradient.
- Computed in fp32 whatever the models ran in; teacher inputs are detached.
- Rows may be feature-cached micro-batches (training/accumulation.py): nothing assumes where a
  row came from. Per-sample outputs are [batch, ...] tensors.
- Positives come from `inputs.local_ids` / `inputs.global_ids` (one id per row: rows with the
  same id are positives of each other), never from row positions, so K captions per image work
  in every term.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from training.distributed import gather_with_grad


@dataclass
class TermInputs:
    """What every term of one loss evaluation sees.

    student / teacher: the output dicts (training/task.py, training/teachers.py); teacher is
    None without a teacher, or {"ensemble": [dicts]} for several stored teachers.
    local_ids / global_ids: the positive-pair id of this rank's rows and of all ranks' rows in
    gathered order (row ids by default; the image's id for each of its K captions).
    step: the optimizer step (for schedules inside a term).
    """
    student: dict
    teacher: dict | None
    local_ids: torch.Tensor
    global_ids: torch.Tensor
    step: int = 0
    fixed_logit_scale: float | None = None
    _gathered: dict = field(default_factory=dict, repr=False)

    def gathered(self, side: str, key: str) -> torch.Tensor:
        """`side` ("student" / "teacher") output `key` in fp32, concatenated over ranks (with
        gradient to this rank's rows); computed once per loss evaluation and shared by terms."""
        if (side, key) not in self._gathered:
            self._gathered[side, key] = gather_with_grad(getattr(self, side)[key].float())
        return self._gathered[side, key]


class LossTerm(nn.Module):
    """One named, unweighted term. Subclasses set `name` and implement `forward`."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    # Output keys beyond image_features / text_features / logit_scale the term reads, so the
    # run can check before training that the task module and the teacher source provide them.
    student_keys: ClassVar[tuple[str, ...]] = ()
    teacher_keys: ClassVar[tuple[str, ...]] = ()

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        raise NotImplementedError


TERMS: dict[str, type[LossTerm]] = {}


def register_term(cls: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: make `cls` nameable as `loss.terms.<cls.name>`."""
    if not cls.name or cls.name in TERMS:
        raise ValueError(f"loss term {cls.__name__}: name {cls.name!r} is empty or taken")
    TERMS[cls.name] = cls
    return cls
