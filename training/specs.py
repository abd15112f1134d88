"""Model specs: what a student or a teacher IS, before anything is built.

A spec is what `model.student` / `model.teacher` (and `clip-eval --model`, `clip-inherit`) name.
It yields the model (`build`), its image preprocessing (`preprocess_cfg`) and its tokenizer
(`tokenizer`: ids, context length, pad id, and an identity that says whether two tokenizers give
the same ids). The spec is the ONE tokenizer source: the training loader, the teacher, periodic
evaluation and `clip-eval` all tokenize through the spec of the model that reads the ids.

    spec = model_spec("configs/models/Tiny-ViT-Student.json")
    model = spec.build()                      # open_clip CLIP, output_dict=True
    ids = spec.tokenizer(["a photo of a dog"])  # [1, spec.tokenizer.context_length]

Kinds: a spec string `KIND:REST` picks a kind from SPEC_KINDS; a string without a known kind
prefix is an open_clip model (a built-in or configs/models name, a JSON config file, or
`local-dir:DIR`, an open_clip export folder). A new kind of tower (timm, Hugging Face, the
project's own) is a new ModelSpec subclass registered in SPEC_KINDS: nothing else changes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
from torch import nn

from training import models


# --------------------------------------------------------------------------- tokenizers

@dataclass(frozen=True)
class TextTokenizer:
    """Captions -> ids [N, context_length] for one model, and what other code needs to know.

    `identity` is equal for two tokenizers exactly when they give the same ids for any caption
    (same kind, vocabulary, context length and options): a teacher whose tokenizer has the
    student's identity reads the student's ids; otherwise the captions are tokenized for it.
    """
    encode: Callable[..., torch.Tensor] = field(repr=False, compare=False)
    context_length: int
    pad_id: int
    vocab_size: int
    identity: str

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.encode(texts)

    def same_ids_as(self, other: "TextTokenizer | None") -> bool:
        return other is not None and self.identity == other.identity


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def open_clip_tokenizer(model_name: str, text_cfg: dict, base_dir: Path | None = None,
                        context_length: int | None = None) -> TextTokenizer:
    """open_clip's tokenizer for a model config (open_clip.get_tokenizer's rules), described.

    A relative `text_cfg.tokenizer_kwargs.bpe_path` (a vocabulary of one's own) is resolved
    against `base_dir`, the folder of the config that names it, not the working directory.
    `open_clip_tokenizer("", {}, context_length=32)` is the default CLIP BPE at 32 tokens.
    """
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if kwargs.get("bpe_path") and base_dir is not None and not os.path.isabs(kwargs["bpe_path"]):
        kwargs["bpe_path"] = str(base_dir / kwargs["bpe_path"])
    if kwargs.get("bpe_path") and not os.path.isfile(kwargs["bpe_path"]):
        raise ValueError(f"model {model_name}: text_cfg.tokenizer_kwargs.bpe_path "
                         f"{kwargs['bpe_path']} not found")
    tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length, **kwargs)
    context = int(getattr(tokenizer, "context_length", None)
                  or text_cfg.get("context_length", 77))
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        vocab = tokenizer.vocab_size
        bpe = kwargs.get("bpe_path")
        identity = {"kind": "clip-bpe", "vocab": vocab,
                    "bpe": _file_digest(bpe) if bpe else "default",
                    "clean": kwargs.get("clean", "lower"),
                    "reduction": kwargs.get("reduction_mask", ""),
                    "special": kwargs.get("additional_special_tokens")}
        pad_id = 0  # SimpleTokenizer pads with zeros
    else:  # HFTokenizer, SigLipTokenizer: a Hugging Face tokenizer underneath
        inner = tokenizer.tokenizer
        vocab = len(inner)
        pad_id = int(inner.pad_token_id or 0)
        identity = {"kind": type(tokenizer).__name__, "name": getattr(inner, "name_or_path", ""),
                    "vocab": vocab, **{k: str(v) for k, v in kwargs.items()}}
    identity["context"] = context
    return TextTokenizer(encode=tokenizer, context_length=context, pad_id=pad_id,
                         vocab_size=vocab, identity=json.dumps(identity, sort_keys=True))


# --------------------------------------------------------------------------- specs

class ModelSpec:
    """A model before it is built. Subclasses implement one kind of model (see SPEC_KINDS)."""

    kind: str = ""

    def __init__(self, source: str):
        self.source = source  # what the config said, for messages

    name: str  # a stable name for logs, exports and checkpoints

    @property
    def model_cfg(self) -> dict:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def preprocess_cfg(self) -> dict:
        """open_clip's preprocessing keys: size, mode, mean, std, interpolation, resize_mode, fill."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> TextTokenizer:
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def image_size(self) -> int | tuple[int, int]:
        return self.preprocess_cfg["size"]

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.preprocess_cfg["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.preprocess_cfg["std"])

    @property
    def interpolation(self) -> str:
        return self.preprocess_cfg["interpolation"]

    def build(self, precision: str = "fp32", device: str | torch.device = "cpu",
              pretrained: str | None = None) -> nn.Module:
        """The model, returning open_clip's output dict (image_features, text_features,
        logit_scale); `pretrained` is a kind-specific tag (a weights FILE is loaded by the
        caller with models.load_strict)."""
        raise NotImplementedError

    def export(self, state: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> Path:
        """Write `state` (the built model's state dict) as a folder this spec kind can name
        again, and return it."""
        raise NotImplementedError

    # A student whose text tower is the teacher's, frozen (LitSpec): it takes the teacher's text
    # features in training instead of computing them a second time.
    text_from_teacher: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"


class OpenClipSpec(ModelSpec):
    """An open_clip model: a built-in name, a configs/models name, a JSON config file or
    `local-dir:DIR` (an export folder)."""

    kind = "open_clip"

    def __init__(self, source: str):
        super().__init__(source)
        self.name = models.resolve_model_name(source)  # one-line ValueError if unknown

    @cached_property
    def model_cfg(self) -> dict:
        return open_clip.get_model_config(self.name)

    @cached_property
    def base_dir(self) -> Path | None:
        """The folder of the config file (relative paths inside it are relative to it)."""
        if self.name.startswith("local-dir:"):
            return Path(self.name[len("local-dir:"):]).resolve()
        if self.source.endswith(".json"):
            return Path(self.source).resolve().parent
        return None

    @cached_property
    def preprocess_cfg(self) -> dict:
        if self.name.startswith("local-dir:"):  # the export says it (no weights to read)
            config = json.loads((self.base_dir / models.EXPORT_CONFIG_FILE).read_text())
            if config.get("preprocess_cfg"):
                return dict(config["preprocess_cfg"])
        with torch.device("meta"), models.quiet_random_init():
            model = open_clip.create_model(self.name, device="meta")
        return dict(open_clip.get_model_preprocess_cfg(model))

    @cached_property
    def tokenizer(self) -> TextTokenizer:
        text_cfg = self.model_cfg.get("text_cfg", {})
        tokenizer = open_clip_tokenizer(self.name, text_cfg, self.base_dir)
        table = text_cfg.get("vocab_size")
        if table is not None and tokenizer.vocab_size > table:  # ids would index past the table
            raise ValueError(f"model {self.source}: its tokenizer has {tokenizer.vocab_size} ids "
                             f"but text_cfg.vocab_size is {table}")
        return tokenizer

    def build(self, precision: str = "fp32", device: str | torch.device = "cpu",
              pretrained: str | None = None) -> nn.Module:
        with models.quiet_random_init():
            return open_clip.create_model(self.name, pretrained=pretrained, precision=precision,
                                          device=device, output_dict=True)

    def export(self, state: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> Path:
        return models.export_open_clip(state, self.name, out_dir,
                                       preprocess_cfg=self.preprocess_cfg,
                                       tokenizer_dir=self.base_dir)


class LitSpec(ModelSpec):
    """`lit:STUDENT`: LiT ("locked-image tuning", here locked TEXT): the student STUDENT (any
    spec) whose text tower is the teacher's, frozen. STUDENT's text tower must be the teacher's
    architecture (an open_clip config with the teacher's `text_cfg` and `embed_dim`: the
    vision tower projects into the teacher's embedding space); `freeze_text_tower` copies the
    teacher's weights into it and freezes it. Everything else (build, preprocessing, tokenizer,
    export) is STUDENT's, so the export is an ordinary model of STUDENT's kind (open_clip format
    for an open_clip config) that evaluation and the next stage load strictly.

    The text tower is every parameter and buffer outside `visual.` except the logit scale and
    bias (open_clip's CLIP and CustomTextCLIP layouts), which stay the student's own, trainable.
    """

    kind = "lit"
    text_from_teacher = True
    OWN_KEYS = ("logit_scale", "logit_bias")

    def __init__(self, source: str):
        super().__init__(source)
        self.inner = model_spec(source)
        self.name = self.inner.name

    @property
    def model_cfg(self) -> dict:
        return self.inner.model_cfg

    @property
    def embed_dim(self) -> int:
        return self.inner.embed_dim

    @property
    def preprocess_cfg(self) -> dict:
        return self.inner.preprocess_cfg

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.inner.tokenizer

    def build(self, precision: str = "fp32", device: str | torch.device = "cpu",
              pretrained: str | None = None) -> nn.Module:
        return self.inner.build(precision=precision, device=device, pretrained=pretrained)

    def export(self, state: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> Path:
        return self.inner.export(state, out_dir)

    def check_teacher(self, teacher: ModelSpec) -> None:
        """One-line ValueError when `teacher`'s text tower cannot be this student's."""
        if not self.tokenizer.same_ids_as(teacher.tokenizer):
            raise ValueError(f"model.student lit:{self.source}: its tokenizer is not the "
                             f"teacher's ({teacher.source}); give it the teacher's text_cfg")
        if self.embed_dim != teacher.embed_dim:
            raise ValueError(f"model.student lit:{self.source}: embed_dim {self.embed_dim} is not "
                             f"the teacher's {teacher.embed_dim} (the vision tower must project "
                             f"into the teacher's text space)")

    @classmethod
    def text_keys(cls, state: dict) -> list[str]:
        return [k for k in state if not k.startswith("visual.") and k not in cls.OWN_KEYS]

    def freeze_text_tower(self, model: nn.Module, teacher_state: dict[str, torch.Tensor]) -> None:
        """Copy the teacher's text tower into `model` (shapes checked: one-line ValueError) and
        freeze it (requires_grad False)."""
        own = model.state_dict()
        keys = self.text_keys(own)
        text = models.fit_state_dict({k: own[k].shape for k in keys},
                                     {k: teacher_state[k] for k in keys if k in teacher_state},
                                     f"the teacher's text tower for lit:{self.source}")
        model.load_state_dict(text, strict=False)
        frozen = set(keys)
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)


SPEC_KINDS: dict[str, type[ModelSpec]] = {OpenClipSpec.kind: OpenClipSpec, LitSpec.kind: LitSpec}


def _load_kinds() -> None:
    """Kinds living in their own packages register themselves in SPEC_KINDS when imported; they
    import this module, so they are imported here, at first use (training/students: composed
    two-tower students)."""
    import training.students.spec  # noqa: F401


def export_folder_spec(folder: str | os.PathLike) -> ModelSpec | None:
    """The spec of a model folder a kind's `export` wrote (recognised by the kind's
    `export_file`), or None."""
    _load_kinds()
    for cls in SPEC_KINDS.values():
        marker = getattr(cls, "export_file", None)
        if marker and (Path(folder) / marker).is_file():
            return cls(str(folder))
    return None


def model_spec(source: str | os.PathLike | ModelSpec) -> ModelSpec:
    """`KIND:REST` -> SPEC_KINDS[KIND](REST); anything else is an open_clip model."""
    if isinstance(source, ModelSpec):
        return source
    _load_kinds()
    source = str(source)
    kind, sep, rest = source.partition(":")
    if sep and kind in SPEC_KINDS:
        return SPEC_KINDS[kind](rest)
    return OpenClipSpec(source)


# --------------------------------------------------------------------------- builders

TEACHER_PRECISIONS = {"fp32": "fp32", "bf16": "pure_bf16", "fp16": "pure_fp16"}


def build_student(spec: str | ModelSpec,
                  init_state_dict: str | os.PathLike | dict[str, torch.Tensor] | None = None,
                  precision: str = "fp32", device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, ModelSpec]:
    """The trainable student, randomly initialised or from a state dict: a file (weight
    inheritance writes one) or the tensors themselves (inherited in-process). `precision` is
    open_clip's (fp32 for DeepSpeed, which casts itself)."""
    spec = model_spec(spec)
    model = spec.build(precision=precision, device=device)
    if isinstance(init_state_dict, dict):
        models.load_strict(model, init_state_dict, "student init (inherited state)")
    elif init_state_dict is not None:
        models.load_strict(model, models.load_state_dict_file(init_state_dict),
                           f"student init {init_state_dict}")
    return model, spec


def build_teacher(spec: str | ModelSpec, pretrained: str | os.PathLike | None = None,
                  dtype: str = "fp32", device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, ModelSpec]:
    """The frozen teacher: eval mode, no gradients, optionally entirely in bf16/fp16.

    `pretrained` is a local state-dict file or an open_clip tag; tags download from a hub,
    and when that fails (offline) the error says to pass a local file instead.
    """
    spec = model_spec(spec)
    if dtype not in TEACHER_PRECISIONS:
        raise ValueError(f"teacher dtype {dtype!r}: expected one of {', '.join(TEACHER_PRECISIONS)}")
    is_file = pretrained is not None and Path(pretrained).suffix in models.STATE_DICT_SUFFIXES
    tag = None if (pretrained is None or is_file) else str(pretrained)
    if tag is not None and tag not in open_clip.list_pretrained_tags_by_model(spec.name):
        raise ValueError(f"teacher pretrained {tag!r} is neither a state-dict file "
                         f"({', '.join(models.STATE_DICT_SUFFIXES)}) nor an open_clip tag of "
                         f"{spec.name}")
    try:
        model = spec.build(precision=TEACHER_PRECISIONS[dtype], device=device, pretrained=tag)
    except RuntimeError as err:
        raise ValueError(f"teacher {spec.name} pretrained {tag!r} could not be downloaded "
                         f"({str(err).splitlines()[0][:200]}); pass a local weights file") from None
    if is_file:
        models.load_strict(model, models.load_state_dict_file(pretrained),
                           f"teacher weights {pretrained}")
    model.eval().requires_grad_(False)
    return model, spec

