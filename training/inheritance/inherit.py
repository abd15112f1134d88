"""Manual inheritance of one student from one teacher, in memory (training/inheritance/manual.py
plans and slices; this builds the two models and scores units for the width rule).

    state, plan, counts = inherit(InheritRequest(teacher="ViT-B-32", student=..., out=...))
    state = inherit_from_teacher("Tiny-ViT-Teacher", "teacher.safetensors", "Tiny-ViT-Student")

`clip-inherit` (cli.py) writes `inherit`'s result with its record; the trainer's
`model.student_init: teacher` loads `inherit_from_teacher`'s (the same tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from .. import models
from ..specs import build_student, build_teacher
from .importance import activation_scores, weight_norm_scores
from .manual import DEPTH_RULES, InheritancePlan, apply_plan, plan_inheritance
from .record import weights_file_of

WIDTH_CHOICES = ("front", "weight-norm", "activation")


@dataclass
class InheritRequest:
    """Everything one inheritance depends on (what the record's inputs hash covers)."""
    teacher: str
    student: str
    out: str
    teacher_pretrained: str | None = None
    depth: str = "uniform"
    width: str = "front"
    data: str | None = None
    batches: int = 4
    batch_size: int = 32


def check_request(req: InheritRequest) -> None:
    """Bad arguments fail here, in one line, before any model is built."""
    if req.depth not in DEPTH_RULES:
        raise ValueError(f"--depth {req.depth!r}: expected one of {', '.join(DEPTH_RULES)}")
    if req.width not in WIDTH_CHOICES:
        raise ValueError(f"--width {req.width!r}: expected one of {', '.join(WIDTH_CHOICES)}")
    if req.width == "activation" and not req.data:
        raise ValueError("--width activation needs --data (a shard spec)")
    if req.batches < 1 or req.batch_size < 1:
        raise ValueError(f"--batches and --batch-size must be >= 1 (got {req.batches}, {req.batch_size})")
    if req.teacher_pretrained and not weights_file_of(req.teacher_pretrained) \
            and Path(req.teacher_pretrained).suffix in models.STATE_DICT_SUFFIXES:
        raise ValueError(f"--teacher-pretrained {req.teacher_pretrained}: file not found")


def importance_scores(req: InheritRequest, teacher: torch.nn.Module, info) -> dict | None:
    if req.width == "front":
        return None
    if req.width == "weight-norm":
        return weight_norm_scores(teacher)
    # The evaluation reader: every sample once, in shard order, unaugmented (what statistics want).
    from ..evaluation.datasets import build_eval_loader, open_eval_set
    from ..evaluation.suite import eval_transform
    loader = build_eval_loader(open_eval_set(req.data), eval_transform(info.preprocess_cfg),
                               req.batch_size)
    batches = ((b["image"], info.tokenizer([captions[0] for captions in b["captions"]]))
               for b in islice(loader, req.batches) if b["image"] is not None)
    return activation_scores(teacher, batches)


def inherit(req: InheritRequest) -> tuple[dict[str, torch.Tensor], InheritancePlan, dict]:
    """The student's inherited state dict (every tensor filled), the plan and both models'
    parameter counts; nothing is written. Deterministic: the same inputs give the same tensors."""
    teacher, tinfo = build_teacher(req.teacher, req.teacher_pretrained)
    student, _ = build_student(req.student)
    plan = plan_inheritance(teacher, student, req.depth,
                            "front" if req.width == "front" else "importance",
                            importance_scores(req, teacher, tinfo))
    state = apply_plan(teacher.state_dict(), student, plan)
    models.load_strict(student, state, "inherited state")  # every student tensor filled
    counts = {"teacher": models.tower_param_counts(teacher),
              "student": models.tower_param_counts(student)}
    return state, plan, counts


def inherit_from_teacher(teacher: str, teacher_pretrained: str, student: str
                         ) -> dict[str, torch.Tensor]:
    """`model.student_init: teacher`: the state dict `clip-inherit --teacher T --teacher-pretrained
    P --student S` would write (the default rule: --depth uniform --width front), computed in
    this process. The global RNG is left as it was (building the two models draws from it), so a
    run starting so is the run starting from that file. ValueError (one line) when the student
    cannot inherit from the teacher."""
    req = InheritRequest(teacher=teacher, student=student, out="",
                         teacher_pretrained=teacher_pretrained)
    check_request(req)
    with torch.random.fork_rng(devices=[]):
        return inherit(req)[0]
