"""TinyCLIP's affinity mimicking (Wu et al., ICCV 2023), with an ensemble of stored teachers.

    loss = 1/2 [ CE(softmax(s * S_img @ S_txt^T), p_i2t) + CE(softmax(s * S_txt @ S_img^T), p_t2i) ]

soft-target cross-entropy of the student's image->text and text->image logits against the
teacher's probabilities. For an ensemble ({"ensemble": [dicts]}, stored embeddings of several
teachers) the targets are the members' softmax probabilities, each at its own logit scale,
averaged after the softmax (MobileCLIP's reinforced-data recipe). With K captions per image the
matrices are images x texts; the teacher's texts are the same K captions in the same order.
"""
from __future__ import annotations

import torch

from training.objectives.base import LossTerm, TermInputs, register_term, symmetric_cross_entropy


def teacher_probs(inputs: TermInputs) -> list[torch.Tensor]:
    """The affinity targets (image -> text, text -> image), averaged over the teachers."""
    members = inputs.teacher_members()
    probs = [0.0, 0.0]
    for index in range(len(members)):
        probs = [p + z.softmax(dim=-1) for p, z in zip(probs, inputs.teacher_logits(index))]
    return [p / len(members) for p in probs]


@register_term
class AffinityTerm(LossTerm):
    name = "affinity"
    needs_teacher = True

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        return symmetric_cross_entropy(inputs.student_logits(), teacher_probs(inputs))
