"""Intermediate-feature distillation: chosen blocks of each student tower mimic chosen teacher
blocks, through small alignment MLPs (Mobile CLIP's feature-level distillation; CLIP-KD's feature
distillation on intermediate tokens).

    loss:
      terms:
        intermediate:
          weight: 1.0
          pairs: {image: [[1, 3]], text: [[1, 3]]}    # [student block, teacher block] per tower
          kind: mse                                   # or cosine (per token)

The student's block outputs (`image_blocks.<s>` [B, tokens, student width], training/tokens.py)
go through the task head `BlockAlignment` (one MLP per chosen student block: width_s -> width_t
-> width_t, GELU between), which adds `image_blocks_aligned.<s>` [B, tokens, teacher width];
the term compares it with the teacher's `image_blocks.<t>` over every token (class token and
patches, or every text position): MSE, or 1 - cosine per token, averaged. The pair's token
counts must match (same patch grid / context length), checked before training
(`check_pairs`). Per rank the mean over its rows: no gathering needed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.objectives.base import LossTerm, TermInputs, TermModels, register_term
from training.task import TaskHead
from training.tokens import block_key, tower_layout

TOWERS = ("image", "text")
KINDS = ("mse", "cosine")


def aligned_key(tower: str, block: int) -> str:
    """The alignment head's output for student block `block` of `tower`."""
    return f"{tower}_blocks_aligned.{block}"


def parse_pairs(pairs: Mapping[str, Sequence[Sequence[int]]], where: str = "pairs"
                ) -> list[tuple[str, int, int]]:
    """[(tower, student block, teacher block)] from {"image": [[s, t], ...], "text": [...]},
    or a one-line ValueError naming `where`."""
    if not isinstance(pairs, Mapping) or not pairs or set(pairs) - set(TOWERS):
        raise ValueError(f"{where}: expected a mapping with keys among {', '.join(TOWERS)} of "
                         f"[[student block, teacher block], ...], got {pairs!r}")
    out = []
    for tower in TOWERS:
        for pair in pairs.get(tower) or ():
            if (not isinstance(pair, Sequence) or len(pair) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0
                               for b in pair)):
                raise ValueError(f"{where}.{tower}: {pair!r} is not [student block, teacher "
                                 f"block] (two block indices >= 0)")
            out.append((tower, pair[0], pair[1]))
    if not out:
        raise ValueError(f"{where}: no block pair given")
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: a block pair is listed twice")
    return out


def check_pairs(pairs: list[tuple[str, int, int]], student: nn.Module, teacher: nn.Module,
                where: str = "pairs") -> None:
    """One-line ValueError, before training, when a pair names a block a tower lacks, a tower
    that is not a transformer, or blocks whose token counts differ."""
    for tower, s, t in pairs:
        sides = {"student": (student, s), "teacher": (teacher, t)}
        layouts = {}
        for side, (model, block) in sides.items():
            layouts[side] = tower_layout(model, tower, f"{where}.{tower}: {side}")
            if block >= layouts[side]["blocks"]:
                raise ValueError(f"{where}.{tower}: {side} block {block} does not exist "
                                 f"({layouts[side]['blocks']} blocks)")
        if layouts["student"]["tokens"] != layouts["teacher"]["tokens"]:
            raise ValueError(f"{where}.{tower}: student and teacher blocks have "
                             f"{layouts['student']['tokens']} vs {layouts['teacher']['tokens']} "
                             f"tokens per sample (patch grid or context length differ)")


class BlockAlignment(TaskHead):
    """One small MLP per chosen student block, mapping its tokens to the teacher's width.

    Reads `<tower>_blocks.<s>` (captured from the student's forward, so they are listed in
    `token_inputs`) and adds `<tower>_blocks_aligned.<s>`.
    """

    def __init__(self, pairs: list[tuple[str, int, int]], student_widths: Mapping[str, int],
                 teacher_widths: Mapping[str, int]):
        super().__init__()
        blocks = sorted({(tower, s) for tower, s, _ in pairs})
        self.token_inputs = tuple(block_key(tower, s) for tower, s in blocks)
        self.mlps = nn.ModuleDict({
            f"{tower}_{s}": nn.Sequential(nn.Linear(student_widths[tower], teacher_widths[tower]),
                                          nn.GELU(),
                                          nn.Linear(teacher_widths[tower], teacher_widths[tower]))
            for tower, s in blocks})

    @classmethod
    def for_models(cls, pairs: list[tuple[str, int, int]], student: nn.Module,
                   teacher: nn.Module, where: str = "pairs") -> "BlockAlignment":
        """The head for `pairs` between these two models (checked with check_pairs)."""
        check_pairs(pairs, student, teacher, where)
        towers = {tower for tower, _, _ in pairs}
        widths = [{tower: tower_layout(model, tower)["width"] for tower in towers}
                  for model in (student, teacher)]
        return cls(pairs, *widths)

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, mlp in self.mlps.items():
            tower, block = name.rsplit("_", 1)
            tokens = outputs[block_key(tower, int(block))]
            out[aligned_key(tower, int(block))] = mlp(tokens.to(mlp[0].weight.dtype))
        return out


@register_term
class IntermediateTerm(LossTerm):
    """Mean over the block pairs of the token-wise distance between the student's aligned block
    outputs and the teacher's (module doc)."""

    name = "intermediate"
    single_teacher = True

    def __init__(self, pairs: Mapping[str, Sequence[Sequence[int]]], kind: str = "mse"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"loss.terms.intermediate.kind: {kind!r} is not one of "
                             f"{', '.join(KINDS)}")
        self.pairs = parse_pairs(pairs, "loss.terms.intermediate.pairs")
        self.kind = kind
        self.student_keys = tuple(dict.fromkeys(aligned_key(tw, s) for tw, s, _ in self.pairs))
        self.teacher_keys = tuple(dict.fromkeys(block_key(tw, t) for tw, _, t in self.pairs))

    def task_heads(self, models: TermModels) -> dict[str, nn.Module]:
        """The alignment MLPs (student block width -> teacher block width), checked against both
        models; the teacher source was already asked for the blocks (a model-less one refused)."""
        return {"intermediate": BlockAlignment.for_models(
            self.pairs, models.student, models.teacher.model, "loss.terms.intermediate.pairs")}

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        teacher = inputs.teacher
        if teacher is None or "ensemble" in teacher:
            raise ValueError("loss.terms.intermediate: needs one live teacher")
        total = 0.0
        for tower, s, t in self.pairs:
            student_tokens = inputs.student[aligned_key(tower, s)].float()
            teacher_tokens = teacher[block_key(tower, t)].float().detach()
            if student_tokens.shape != teacher_tokens.shape:
                raise ValueError(f"loss.terms.intermediate: {aligned_key(tower, s)} "
                                 f"{tuple(student_tokens.shape)} vs teacher {block_key(tower, t)} "
                                 f"{tuple(teacher_tokens.shape)}")
            if self.kind == "mse":
                total = total + F.mse_loss(student_tokens, teacher_tokens)
            else:
                total = total + (1 - F.cosine_similarity(student_tokens, teacher_tokens,
                                                         dim=-1)).mean()
        return total / len(self.pairs)
