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
  in every term. With K captions the text rows outnumber the image rows K to 1: the ids above
  are the IMAGE rows' ids and `inputs.local_text_ids` / `inputs.global_text_ids` the text
  rows' (the id of the image each caption belongs to); with K = 1 they are the same tensors.
  `inputs.targets()` turns them into the image->text (soft over the K) and text->image (hard)
  target distributions.
- A term that needs a trainable part returns it from `task_heads(models)` (the trainer adds it
  to the task module, training/task.py); the part adds entries to the student's outputs.
  `models` (TermModels) holds the student module, the teacher source and both widths.
- Token-level keys (training/tokens.py: `image_patch_tokens`, `image_blocks.<i>`, ...) named in
  `student_keys` / `teacher_keys` are captured for the term: the task module and the live
  teacher add them to their outputs; a teacher source without a model refuses before training.

Shared helpers for terms (each computed once per loss evaluation where it is expensive):
`inputs.student_scale()` / `inputs.teacher_scale(member)` (the fixed scale, else each model's
own), `inputs.teacher_members()` (one dict per teacher of an ensemble), `inputs.logits(...)`
(local rows x gathered columns, both directions), `soft_cross_entropy`, `kl_divergence`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

import torch.nn.functional as F

from training.distributed import gather_with_grad


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j p_j log softmax(logits)_j (= KL(p || q) + H(p))."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def symmetric_cross_entropy(logits: tuple[torch.Tensor, torch.Tensor],
                            targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The mean of soft_cross_entropy over the two directions (image -> text, text -> image)."""
    return sum(soft_cross_entropy(z, p) for z, p in zip(logits, targets)) / 2


def kl_divergence(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || softmax(logits)) (0 where p is 0)."""
    log_p = torch.log(target_probs.clamp_min(1e-30))
    return (target_probs * (log_p - F.log_softmax(logits, dim=-1))).sum(dim=-1).mean()


def contrastive_targets(local_ids: torch.Tensor, global_ids: torch.Tensor) -> torch.Tensor:
    """Target distribution of each local row over the global columns: uniform over the columns
    with the same id. With ids = row positions this is one-hot (one positive per row); giving
    several captions of one image the same id makes it the multi-positive target."""
    positives = (local_ids[:, None] == global_ids[None, :]).float()
    return positives / positives.sum(dim=1, keepdim=True)


@dataclass
class TermInputs:
    """What every term of one loss evaluation sees.

    student / teacher: the output dicts (training/task.py, training/teachers.py); teacher is
    None without a teacher, or {"ensemble": [dicts]} for several stored teachers.
    local_ids / global_ids: the positive-pair id of this rank's rows and of all ranks' rows in
    gathered order (row ids by default; the image's id for each of its K captions).
    local_text_ids / global_text_ids: the same for the text rows (None: the image rows' ids,
    K = 1: one caption per image).
    step: the optimizer step (for schedules inside a term).
    """
    student: dict
    teacher: dict | None
    local_ids: torch.Tensor
    global_ids: torch.Tensor
    step: int = 0
    fixed_logit_scale: float | None = None
    local_text_ids: torch.Tensor | None = None
    global_text_ids: torch.Tensor | None = None
    _gathered: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.local_text_ids is None:
            self.local_text_ids, self.global_text_ids = self.local_ids, self.global_ids

    def gathered(self, side: str, key: str) -> torch.Tensor:
        """`side` ("student" / "teacher") output `key` in fp32, concatenated over ranks (with
        gradient to this rank's rows); computed once per loss evaluation and shared by terms."""
        if (side, key) not in self._gathered:
            self._gathered[side, key] = gather_with_grad(getattr(self, side)[key].float())
        return self._gathered[side, key]

    # ---- helpers terms share ---------------------------------------------------------------
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image -> text, text -> image) targets over the gathered columns: each image row
        uniform over its K captions (soft), each text row one-hot on its image (hard)."""
        return (contrastive_targets(self.local_ids, self.global_text_ids),
                contrastive_targets(self.local_text_ids, self.global_ids))

    def student_scale(self) -> torch.Tensor:
        """The student's (exponentiated) scale, or the fixed one. A fixed scale still touches
        the learned one with weight 0, so the student's logit_scale gets a (zero) gradient every
        step, as DDP and DeepSpeed expect of every trainable parameter."""
        logit_scale = self.student["logit_scale"].float().reshape(())
        if self.fixed_logit_scale is None:
            return logit_scale
        return self.fixed_logit_scale + 0.0 * logit_scale

    def teacher_members(self) -> list[dict]:
        """One output dict per teacher (several for a stored ensemble)."""
        if self.teacher is None:
            raise ValueError("loss: a term needs teacher outputs, but the run has no teacher")
        return self.teacher.get("ensemble", [self.teacher])

    def single_teacher(self, term: str) -> dict:
        """The one teacher's outputs; an ensemble is an error for `term`."""
        members = self.teacher_members()
        if len(members) != 1 or "ensemble" in self.teacher:
            raise ValueError(f"loss {term} term: needs one teacher, got an ensemble")
        return members[0]

    def teacher_scale(self, member: dict) -> torch.Tensor | float:
        """The fixed scale, else the teacher's own (precomputed teacher outputs may omit it when
        the scale is fixed)."""
        if self.fixed_logit_scale is not None:
            return self.fixed_logit_scale
        if member.get("logit_scale") is None:
            raise ValueError("loss: teacher outputs lack logit_scale and fixed_logit_scale is None")
        return member["logit_scale"].float().reshape(()).detach()

    def gathered_member(self, index: int, key: str) -> torch.Tensor:
        """Teacher member `index`'s output `key` (fp32, detached), concatenated over ranks."""
        if (index, key) not in self._gathered:
            value = self.teacher_members()[index][key].float().detach()
            self._gathered[index, key] = gather_with_grad(value)
        return self._gathered[index, key]

    def logits(self, image: torch.Tensor, text: torch.Tensor, image_all: torch.Tensor,
               text_all: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """(image -> text, text -> image) logits: local rows x gathered columns, times `scale`."""
        return scale * image.float() @ text_all.T, scale * text.float() @ image_all.T

    def student_logits(self, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's (image -> text, text -> image) logits at `scale` (default: its own or
        the fixed one)."""
        s = self.student
        return self.logits(s["image_features"], s["text_features"],
                           self.gathered("student", "image_features"),
                           self.gathered("student", "text_features"),
                           self.student_scale() if scale is None else scale)

    def teacher_logits(self, index: int, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher member `index`'s logits (detached) at `scale` (default: teacher_scale)."""
        member = self.teacher_members()[index]
        return self.logits(member["image_features"].detach(), member["text_features"].detach(),
                           self.gathered_member(index, "image_features"),
                           self.gathered_member(index, "text_features"),
                           self.teacher_scale(member) if scale is None else scale)


@dataclass
class TermModels:
    """What a term may look at when it builds its trainable parts (before training): the
    student module, the teacher source (training/teachers.py; None without a teacher; a live
    one has `.model`) and the embedding widths."""
    student: nn.Module
    teacher: object | None
    student_dim: int
    teacher_dim: int | None


class LossTerm(nn.Module):
    """One named, unweighted term. Subclasses set `name` and implement `forward`."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    single_teacher: ClassVar[bool] = False  # True: an ensemble of stored teachers is an error
    # Output keys beyond image_features / text_features / logit_scale the term reads, so the
    # run can check before training that the task module and the teacher source provide them.
    student_keys: ClassVar[tuple[str, ...]] = ()
    teacher_keys: ClassVar[tuple[str, ...]] = ()

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        raise NotImplementedError

    def scales(self, inputs: TermInputs) -> dict[str, torch.Tensor]:
        """Scales or temperatures of its own the term applied, to log (e.g. a learned
        temperature: read from the outputs, which is ZeRO-3 safe). Default: none."""
        return {}

    def task_heads(self, models: TermModels) -> dict[str, nn.Module]:
        """Trainable parts this term needs in the task module (training/task.py TaskHead), by
        head name (its checkpoint keys are heads.<name>.*). Default: none."""
        return {}


TERMS: dict[str, type[LossTerm]] = {}


def register_term(cls: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: make `cls` nameable as `loss.terms.<cls.name>`."""
    if not cls.name or cls.name in TERMS:
        raise ValueError(f"loss term {cls.__name__}: name {cls.name!r} is empty or taken")
    TERMS[cls.name] = cls
    return cls
