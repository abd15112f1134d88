"""The ground-truth contrastive loss (CLIP; OpenCLIP's ClipLoss), on the student alone.

    loss = 1/2 [ CE(s * S_img @ S_txt^T, targets_i2t) + CE(s * S_txt @ S_img^T, targets_t2i) ]

With K captions per image the image->text target is uniform over the image's K captions and
the text->image target one-hot on its image (TinyCLIP-ConvFFN's multi-positive rule); with one
caption per image this is exactly ClipLoss.
"""
from __future__ import annotations

import torch

from training.objectives.base import LossTerm, TermInputs, register_term, symmetric_cross_entropy


@register_term
class ClipTerm(LossTerm):
    name = "clip"
    needs_teacher = False

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        return symmetric_cross_entropy(inputs.student_logits(), inputs.targets())
