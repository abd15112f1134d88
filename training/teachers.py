"""Teacher sources: where the teacher's outputs for a training step come from.

    teacher = build_teacher_source(cfg.model, device)     # None without a teacher
    teacher.tokenizer, teacher.preprocess_cfg, teacher.embed_dim   # what the loader and heads need
    outputs = teacher.outputs(micro_batches)   # one dict for the whole step (no gradient)

A source tells the data pipeline which views it reads (`preprocess_cfg`: its image view, None
for none; `tokenizer`: its caption ids, None for none) and returns the loss's teacher dict
(image_features, text_features, logit_scale; training/objectives/) for the step's micro-batches,
plus the token-level outputs a loss term asked for with `require_outputs` (training/tokens.py:
a live teacher captures them in its forward; a stored-embedding teacher refuses in one line),
reading the batch keys `teacher_image` and `teacher_text` (training/data). Sources
(`model.teacher_source`): a live open_clip model (`LiveTeacher`), or the embeddings
`clip-data embed` stored beside the shards (`StoredTeacher`: no model; one or several teachers,
an ensemble's outputs are {"ensemble": [one dict per teacher]}). `embeddings` (an EmbeddingSets,
or None) tells the loader to take the views' crops and captions from a stored set. A new source is
a new subclass and an entry in TEACHER_SOURCES; the trainer does not change.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from training import models
from training.accumulation import concat_outputs
from training.config import ModelConfig
from training.data.config import DataConfig
from training.files import sha256_file
from training.specs import ModelSpec, TextTokenizer, build_teacher, model_spec
from training.text_prefix import encode_used_tokens
from training.tokens import TokenCapture


def teacher_identity(spec: ModelSpec | str, pretrained: Optional[str]) -> dict:
    """What makes two teachers' embeddings the same: architecture (name, config hash), weights
    (open_clip tag, or the file's sha256), image preprocessing and embedding width. Recorded
    by clip-data embed per teacher; a run reading the set compares it with its config's."""
    spec = model_spec(spec)
    is_file = pretrained is not None and Path(pretrained).suffix in models.STATE_DICT_SUFFIXES
    config = json.dumps(spec.model_cfg, sort_keys=True).encode()
    return {"model": spec.name, "config_sha256": hashlib.sha256(config).hexdigest(),
            "pretrained": None if is_file else pretrained,
            "weights_sha256": sha256_file(pretrained) if is_file else None,
            "preprocess": json.loads(json.dumps(spec.preprocess_cfg, sort_keys=True)),
            "embed_dim": spec.embed_dim}


def _config_teachers(cfg: ModelConfig) -> list[tuple[str, Optional[str], Optional[float]]]:
    """(model, pretrained, logit scale) of each teacher the config names, in order."""
    return [(cfg.teacher, cfg.teacher_pretrained, cfg.teacher_logit_scale)] + [
        (member.model, member.pretrained, member.logit_scale) for member in cfg.ensemble]


def _embedding_sets(cfg: ModelConfig, data: Optional[DataConfig]):
    """The run's embedding set, checked against the shards and the config's teachers (one-line
    DataError before training), or None when the run reads none."""
    if cfg.teacher_embeddings is None:
        return None, None
    from training.data.sidecar import EmbeddingSets
    from training.data.sources import parse_sources
    sets = EmbeddingSets(cfg.teacher_embeddings)
    urls = [url for source in parse_sources(data.train, data.train_weights) for url in source.urls]
    teachers = [teacher_identity(model, pretrained)
                for model, pretrained, _ in _config_teachers(cfg)]
    return sets, sets.check(urls, teachers)


class TeacherSource:
    """The interface the trainer uses (see the module doc)."""

    kind: str = ""
    spec: Optional[ModelSpec] = None
    embeddings = None  # an EmbeddingSets: the loader's views and captions come from it

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

    def require_outputs(self, keys: Iterable[str], who: str) -> None:
        """Make `outputs` also return the token-level `keys` (training/tokens.py) that `who`
        (e.g. "loss.terms.attribution") reads; a one-line ValueError, before training, from a
        source that has no model to capture them from."""
        keys = sorted(set(keys))
        if keys:
            raise ValueError(f"{who} needs the teacher's {', '.join(keys)}, which "
                             f"model.teacher_source={self.kind} cannot give (no teacher model "
                             f"runs): use model.teacher_source=live")


class LiveTeacher(TeacherSource):
    """A frozen model run on every step's batches (eval mode, no gradients, teacher_dtype)."""

    kind = "live"

    def __init__(self, cfg: ModelConfig, device: torch.device, data: Optional[DataConfig] = None):
        # With model.teacher_embeddings: the live teacher on a stored set's augmentations.
        self.embeddings, _ = _embedding_sets(cfg, data)
        model, self.spec = build_teacher(cfg.teacher, cfg.teacher_pretrained, cfg.teacher_dtype)
        self.model = model.to(device)
        self.capture: Optional[TokenCapture] = None

    def require_outputs(self, keys: Iterable[str], who: str) -> None:
        """Capture the token-level `keys` in the teacher's forward (added to the ones before)."""
        keys = set(keys) | set(self.capture.keys if self.capture is not None else ())
        if self.capture is not None:
            self.capture.remove()
        self.capture = TokenCapture(self.model, keys, who=f"{who}: teacher") if keys else None

    @torch.no_grad()
    def outputs(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        return concat_outputs([self.encode(mb["teacher_image"], mb["teacher_text"],
                                           mb.get("teacher_text_length"))
                               for mb in micro_batches])

    def encode(self, images: torch.Tensor, texts: torch.Tensor,
               text_length: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The teacher's outputs, its causal text tower on the batch's used tokens
        (training/text_prefix.py; `text_length`: the loader's count); with text token-level
        outputs asked for (require_outputs) on the whole context (compared position by
        position)."""
        return encode_used_tokens(self.model, self.capture, images, texts, text_length)


class StoredTeacher(TeacherSource):
    """Teacher embeddings read from the shards' embedding set (clip-data embed): no model is
    built or loaded. The loader joins each sample's stored embeddings of the very augmentation
    and caption the student sees; `outputs` returns them (re-normalised in fp32: bf16/fp16 sets
    are only nearly unit-norm), one dict per teacher for an ensemble, each with its logit scale
    (model.teacher_logit_scale / model.ensemble[i].logit_scale, else the teacher's own)."""

    kind = "shards"

    def __init__(self, cfg: ModelConfig, device: torch.device, data: Optional[DataConfig] = None):
        self.embeddings, info = _embedding_sets(cfg, data)
        self.teachers = info["teachers"]
        self.scales = [stored["logit_scale"] if scale is None else scale
                       for stored, (_, _, scale) in zip(self.teachers, _config_teachers(cfg))]
        self.device = device

    @property
    def embed_dim(self) -> int:
        return int(self.teachers[0]["embed_dim"])

    @property
    def tokenizer(self) -> Optional[TextTokenizer]:
        return None  # the captions' embeddings are stored

    @property
    def preprocess_cfg(self) -> Optional[dict]:
        return None  # no teacher view: the stored crop's embedding is read instead

    @torch.no_grad()
    def outputs(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        members = []
        for t, scale in enumerate(self.scales):
            joined = {kind: F.normalize(torch.cat([mb[f"stored_{kind}.{t}"] for mb in micro_batches])
                                        .to(self.device, torch.float32), dim=-1)
                      for kind in ("image", "text")}
            members.append({"image_features": joined["image"], "text_features": joined["text"],
                            "logit_scale": torch.tensor(float(scale), device=self.device)})
        return members[0] if len(members) == 1 else {"ensemble": members}


TEACHER_SOURCES: dict[str, type[TeacherSource]] = {LiveTeacher.kind: LiveTeacher,
                                                   StoredTeacher.kind: StoredTeacher}


def build_teacher_source(cfg: ModelConfig, device: torch.device,
                         data: Optional[DataConfig] = None) -> Optional[TeacherSource]:
    """The config's teacher source; `data` (the run's data section) is needed when the run
    reads an embedding set (model.teacher_embeddings), to check it covers the shards."""
    if cfg.teacher is None:
        return None
    return TEACHER_SOURCES[cfg.teacher_source](cfg, device, data)
