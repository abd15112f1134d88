"""Feature distillation: the distance between student and teacher embeddings, per row.

    mse:    mean over rows and dims of (S - T)^2            (CLIP-KD's feature distillation)
    cosine: mean over rows of 1 - cos(S, T)

averaged over the image and the text embeddings. When the widths differ, the term's
FeatureProjection head (training/task.py) adds `image_features_projected` /
`text_features_projected` to the student's outputs and the term compares those.
TinyCLIP-ConvFFN's "L2 on normalised embeddings", ||S/|S| - T/|T|||^2 = 2 (1 - cos), is the
cosine kind at twice the weight (tests/objectives/test_terms.py checks the identity).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.objectives.base import LossTerm, TermInputs, TermModels, register_term
from training.task import FeatureProjection

FEATURE_KINDS = ("mse", "cosine")


def student_features(inputs: TermInputs, kind: str) -> torch.Tensor:
    """The student's `kind` embeddings, projected to the teacher's width when a head does."""
    return inputs.student.get(f"{kind}_projected", inputs.student[kind]).float()


def projection_heads(student_dim: int, teacher_dim: int | None) -> dict:
    """The projection head that maps the student's embeddings to the teacher's width, if they
    differ (shared by every term that compares embeddings across the two models)."""
    if teacher_dim is None or teacher_dim == student_dim:
        return {}
    return {"projection": FeatureProjection(student_dim, teacher_dim)}


@register_term
class FeatureTerm(LossTerm):
    name = "feature"
    needs_teacher = True
    single_teacher = True

    def __init__(self, kind: str = "mse"):
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise ValueError(f"must be one of {FEATURE_KINDS}, got {kind!r}")
        self.kind = kind

    def task_heads(self, models: TermModels) -> dict:
        return projection_heads(models.student_dim, models.teacher_dim)

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        teacher = inputs.single_teacher(self.name)
        return sum(self.distance(student_features(inputs, key), teacher[key].float().detach())
                   for key in ("image_features", "text_features")) / 2

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"loss feature term: student features {tuple(student.shape)} vs "
                             f"teacher {tuple(teacher.shape)}; a FeatureProjection head "
                             f"(training/task.py) maps the student to the teacher's width")
        if self.kind == "mse":
            return F.mse_loss(student, teacher)
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
