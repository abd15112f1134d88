"""Teacher sources: where the teacher's outputs for a training step come from.

    teacher = build_teacher_source(cfg.model, device)     # None without a teacher
    teacher.tokenizer, teacher.preprocess_cfg, teacher.embed_dim   # what the loader and heads need
    outputs = teacher.outputs(micro_batches)   # one dict for the whole step (no gradient)

A source tells the data pipeline which views it reads (`preprocess_cfg`: its image view, None
for none; `tokenizer`: its caption ids, None for none) and returns the loss's teacher dict
(image_features, text_features, logit_scale; training/losses.py) for the step's micro-batches,
reading the batch keys `teacher_image` and `teacher_text` (training/data). Today: a live open_clip
model (`LiveTeacher`). A new source (e.g. embeddings stored in the shards) is a new subclass and
an entry in TEACHER_SOURCES; the trainer does not change.
"""
from __future__ import annotations

from typing import Optional

import torch

from training import models
from training.accumulation import concat_outputs
from training.config import ModelConfig
from training.specs import ModelSpec, TextTokenizer, build_teacher


class TeacherSource:
    """The interface the trainer uses (see the module doc)."""

    kind: str = ""
    spec: Optional[ModelSpec] = None

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def tokenizer(self) -> Optional[TextTokenizer]:
        return self.spec.tokenizer

    @property
    def preprocess_cfg(self) -> Optional[dict]:
        return self.spec.preprocess_cfg

    def outputs(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LiveTeacher(TeacherSource):
    """A frozen model run on every step's batches (eval mode, no gradients, teacher_dtype)."""

    kind = "live"

    def __init__(self, cfg: ModelConfig, device: torch.device):
        model, self.spec = build_teacher(cfg.teacher, cfg.teacher_pretrained, cfg.teacher_dtype)
        self.model = model.to(device)

    @torch.no_grad()
    def outputs(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        return concat_outputs([models.encode(self.model, mb["teacher_image"], mb["teacher_text"])
                               for mb in micro_batches])


TEACHER_SOURCES: dict[str, type[TeacherSource]] = {LiveTeacher.kind: LiveTeacher}


def build_teacher_source(cfg: ModelConfig, device: torch.device) -> Optional[TeacherSource]:
    if cfg.teacher is None:
        return None
    return TEACHER_SOURCES["live"](cfg, device)
