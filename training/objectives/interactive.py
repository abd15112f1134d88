"""CLIP-KD's interactive contrastive learning (Yang et al., CVPR 2024, "ICL"): the student's
embeddings contrasted against the teacher's embedding space.

    loss = 1/2 [ CE(s * S_img @ T_txt^T, targets_i2t) + CE(s * S_txt @ T_img^T, targets_t2i) ]

Each student image is the anchor among the teacher's texts, each student text among the
teacher's images, with the ground-truth (multi-positive with K captions) targets; the scale s is
the student's (or loss.fixed_logit_scale). When the widths differ, the projection head (shared
with the feature term) maps the student's embeddings to the teacher's, normalised again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.objectives.base import (LossTerm, TermInputs, TermModels, register_term,
                                      symmetric_cross_entropy)
from training.objectives.feature import projection_heads


def student_embeddings(student: dict, key: str) -> torch.Tensor:
    """The student's unit embeddings, in the teacher's width when a projection head adds them."""
    projected = student.get(f"{key}_projected")
    return student[key].float() if projected is None else F.normalize(projected.float(), dim=-1)


@register_term
class InteractiveTerm(LossTerm):
    name = "interactive"
    needs_teacher = True
    single_teacher = True

    def task_heads(self, models: TermModels) -> dict:
        return projection_heads(models.student_dim, models.teacher_dim)

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        inputs.single_teacher(self.name)
        student_img, student_txt = (student_embeddings(inputs.student, k)
                                    for k in ("image_features", "text_features"))
        t_img, t_txt = (inputs.gathered_member(0, k) for k in ("image_features", "text_features"))
        if student_img.shape[-1] != t_img.shape[-1]:
            raise ValueError(f"loss interactive term: student width {student_img.shape[-1]} vs "
                             f"teacher {t_img.shape[-1]} and no projection head")
        scale = inputs.student_scale()
        logits = (scale * student_img.float() @ t_txt.T, scale * student_txt.float() @ t_img.T)
        return symmetric_cross_entropy(logits, inputs.targets())
