"""The `fused_feature` term: the fusion head's output (training/fusion.py) distilled towards the
teacher's image features, by cosine distance per row (KDEOV distils the visual side of a frozen
CLIP; its fused features would feed a detection head, here this term trains them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.objectives.base import LossTerm, TermInputs, register_term


@register_term
class FusedFeature(LossTerm):
    name = "fused_feature"
    needs_teacher = True
    single_teacher = True
    student_keys = ("fused_image_features",)

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        fused = inputs.student["fused_image_features"].float()
        target = inputs.teacher["image_features"].float().detach()
        if fused.shape != target.shape:
            raise ValueError(f"loss fused_feature term: fused features {tuple(fused.shape)} vs "
                             f"teacher image features {tuple(target.shape)}")
        return (1 - F.cosine_similarity(fused, target, dim=-1)).mean()
