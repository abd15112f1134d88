"""open_clip models for distillation: configs, student and teacher, state-dict files, export.

Everything goes through open_clip itself, so whatever open_clip can build (built-in names, our
JSON configs in configs/models/, `local-dir:` exports) can be a student or a teacher, and what
we export open_clip loads back strictly.

    model, info = build_student("configs/models/Tiny-ViT-Student.json", init_state_dict=None)
    teacher, tinfo = build_teacher("ViT-B-32", pretrained="/data/vit_b_32.safetensors", dtype="bf16")
    out = encode(model, images, info.tokenizer(captions))   # image_features, text_features, logit_scale
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_DIR = REPO_ROOT / "configs" / "models"
REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
EXPORT_CONFIG_FILE = "open_clip_config.json"
EXPORT_WEIGHTS_FILE = "open_clip_model.safetensors"

_registered: set[Path] = set()


# --------------------------------------------------------------------------- model configs

def register_model_configs(*paths: str | os.PathLike) -> None:
    """Make open_clip know the JSON configs in `paths` (folders or files); default configs/models.

    Idempotent: open_clip rescans every registered path on each call, so each is added once.
    """
    for path in (paths or (DEFAULT_CONFIG_DIR,)):
        path = Path(path).resolve()
        if path not in _registered:
            open_clip.add_model_config(path)
            _registered.add(path)


def resolve_model_name(name_or_json: str | os.PathLike) -> str:
    """A model name open_clip can build: a built-in or configs/models name, a JSON config file
    (registered; its stem is the name) or `local-dir:DIR` (an open_clip export folder)."""
    name = str(name_or_json)
    register_model_configs()
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not (folder / EXPORT_CONFIG_FILE).is_file():
            raise ValueError(f"model {name!r}: {folder / EXPORT_CONFIG_FILE} not found")
        return name
    if name.endswith(".json"):
        path = Path(name)
        _check_config_file(path)
        register_model_configs(path)
        return path.stem
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}: not an open_clip built-in nor in "
                         f"{DEFAULT_CONFIG_DIR}; pass a JSON config file or local-dir:DIR")
    return name


def _check_config_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"model config {path} not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path} is not valid JSON: {err}") from None
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"model config {path} lacks {', '.join(missing)} "
                         f"(an open_clip config needs {', '.join(REQUIRED_CONFIG_KEYS)})")


# --------------------------------------------------------------------------- what a model needs

@dataclass
class ModelInfo:
    """What the data pipeline, the loss and the export need to know about a built model."""

    name: str
    model_cfg: dict
    preprocess_cfg: dict  # open_clip's: size, mode, mean, std, interpolation, resize_mode, fill
    tokenizer: Callable[..., torch.Tensor] = field(repr=False)
    param_counts: dict  # image, text (without token embedding), total

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

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

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))


def model_info(model: nn.Module, name: str) -> ModelInfo:
    return ModelInfo(
        name=name,
        model_cfg=open_clip.get_model_config(name),
        preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)),
        tokenizer=open_clip.get_tokenizer(name),
        param_counts=tower_param_counts(model),
    )


def tower_param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per tower, as TinyCLIP names its models: the text count leaves out the token
    embedding (49408 x width, a lookup table that dominates small text towers)."""
    total = sum(p.numel() for p in model.parameters())
    image = sum(p.numel() for p in model.visual.parameters())
    lookup = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith(("token_embedding.weight", "word_embeddings.weight"))
                 or n in ("logit_scale", "logit_bias"))
    return {"image": image, "text": total - image - lookup, "total": total}


# --------------------------------------------------------------------------- state-dict files

def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or .pt/.pth/.bin (a `state_dict` entry or a bare dict),
    with DDP/DeepSpeed `module.` prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"state dict file {path} not found")
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise ValueError(f"state dict file {path}: expected one of {', '.join(STATE_DICT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors of all kinds: say which file, not a traceback
            raise ValueError(f"state dict file {path} cannot be read: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"state dict file {path} holds no tensor dict (nor a 'state_dict' entry)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor of `state` into `model`, or fail with one line naming what does not fit.

    Scalar parameters stored as [1] (see make_deepspeed_safe) or the other way round are
    reshaped, as open_clip's own loader does for logit_scale.
    """
    own = model.state_dict()
    state = fit_state_dict({k: v.shape for k, v in own.items()}, state, source)
    model.load_state_dict(state, strict=True)


def fit_state_dict(shapes: dict[str, torch.Size], state: dict[str, torch.Tensor], source: str
                   ) -> dict[str, torch.Tensor]:
    """`state` with single-element tensors reshaped to `shapes`; a one-line ValueError listing
    missing keys, unexpected keys and shape mismatches if it does not fit exactly."""
    state = {k: v.reshape(shapes[k]) if k in shapes and v.shape != shapes[k]
             and v.numel() == 1 == shapes[k].numel() else v for k, v in state.items()}
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(shapes[k])}"
                  for k in sorted(set(shapes) & set(state)) if state[k].shape != shapes[k]]
    problems = [f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("shape mismatch file vs model", mismatched)) if items]
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems))
    return state


# --------------------------------------------------------------------------- builders

def build_student(name_or_json: str | os.PathLike, init_state_dict: str | os.PathLike | None = None,
                  precision: str = "fp32", device: str | torch.device = "cpu",
                  **create_kwargs: Any) -> tuple[nn.Module, ModelInfo]:
    """The trainable student, randomly initialised or from a state-dict file (weight inheritance
    writes one). `precision` is open_clip's (fp32 for DeepSpeed, which casts itself);
    `create_kwargs` go to open_clip.create_model (e.g. force_patch_dropout)."""
    name = resolve_model_name(name_or_json)
    model = open_clip.create_model(name, precision=precision, device=device, output_dict=True,
                                   **create_kwargs)
    if init_state_dict is not None:
        load_strict(model, load_state_dict_file(init_state_dict), f"student init {init_state_dict}")
    return model, model_info(model, name)


def build_teacher(name_or_json: str | os.PathLike, pretrained: str | os.PathLike | None = None,
                  dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu",
                  ) -> tuple[nn.Module, ModelInfo]:
    """The frozen teacher: eval mode, no gradients, optionally entirely in bf16/fp16.

    `pretrained` is a local state-dict file or an open_clip tag; tags download from a hub,
    and when that fails (offline) the error says to pass a local file instead.
    """
    name = resolve_model_name(name_or_json)
    precision = {torch.float32: "fp32", "fp32": "fp32", torch.bfloat16: "pure_bf16",
                 "bf16": "pure_bf16", torch.float16: "pure_fp16", "fp16": "pure_fp16"}.get(dtype)
    if precision is None:
        raise ValueError(f"teacher dtype {dtype!r}: expected fp32, bf16 or fp16")
    is_file = pretrained is not None and Path(pretrained).suffix in STATE_DICT_SUFFIXES
    tag = None if (pretrained is None or is_file) else str(pretrained)
    if tag is not None and tag not in open_clip.list_pretrained_tags_by_model(name):
        raise ValueError(f"teacher pretrained {tag!r} is neither a state-dict file "
                         f"({', '.join(STATE_DICT_SUFFIXES)}) nor an open_clip tag of {name}")
    try:
        model = open_clip.create_model(name, pretrained=tag, precision=precision, device=device,
                                       output_dict=True)
    except RuntimeError as err:
        raise ValueError(f"teacher {name} pretrained {tag!r} could not be downloaded "
                         f"({str(err).splitlines()[0][:200]}); pass a local weights file") from None
    if is_file:
        load_strict(model, load_state_dict_file(pretrained), f"teacher weights {pretrained}")
    model.eval().requires_grad_(False)
    return model, model_info(model, name)


# --------------------------------------------------------------------------- forward

def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype images must have: that of the first convolution or linear layer's weight (bf16 for
    a pure-bf16 teacher, a bf16 DeepSpeed engine or open_clip's "bf16" precision, which keeps some
    embeddings in fp32; fp32 under autocast)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return module.weight.dtype
    return torch.float32


def encode(model: nn.Module, images: torch.Tensor | None, texts: torch.Tensor | None
           ) -> dict[str, torch.Tensor]:
    """Both towers in one call of the model (so DeepSpeed engines and hooks see a forward):
    L2-normalised image_features and text_features and the exponentiated, 0-dim logit_scale."""
    if images is not None:
        images = images.to(dtype=input_dtype(model))
    out = model(images, texts)
    if not isinstance(out, dict):  # a model built without output_dict
        out = dict(zip(("image_features", "text_features", "logit_scale"), out))
    out = dict(out)
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


# --------------------------------------------------------------------------- DeepSpeed and export

def make_deepspeed_safe(model: nn.Module) -> nn.Module:
    """Turn 0-dim parameters (open_clip's logit_scale, logit_bias) into shape [1], in place.

    DeepSpeed ZeRO-0 with gradient clipping fails on 0-dim parameters, and 0.19.8 fails on them at
    any stage. A [1] tensor broadcasts exactly like a scalar, so the forward result is unchanged.
    Call before building the optimizer; export_open_clip restores the 0-dim shapes.
    """
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.ndim == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1),
                                                   requires_grad=param.requires_grad))
    return model


def reference_shapes(model_name: str) -> dict[str, torch.Size]:
    """The state-dict shapes open_clip expects for `model_name` (built on the meta device: free)."""
    with torch.device("meta"):
        reference = open_clip.create_model(model_name, device="meta")
    return {k: v.shape for k, v in reference.state_dict().items()}


def export_open_clip(model_or_state_dict: nn.Module | dict[str, torch.Tensor],
                     model_name: str | os.PathLike, out_dir: str | os.PathLike,
                     preprocess_cfg: dict | None = None) -> Path:
    """Write the student in open_clip's format and return `out_dir`.

    Files: open_clip_config.json ({"model_cfg", "preprocess_cfg"}, read by
    `create_model("local-dir:" + out_dir)`), open_clip_model.safetensors (open_clip's shapes:
    0-dim logit_scale) and <name>.json (the bare model config, for `add_model_config` +
    `create_model(name, pretrained=out_dir/open_clip_model.safetensors)`). Accepts a module or a
    state dict (e.g. one consolidated from a ZeRO-3 checkpoint); the state dict is checked against
    the model config before anything is written.
    """
    name = resolve_model_name(model_name)
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        preprocess_cfg = preprocess_cfg or dict(open_clip.get_model_preprocess_cfg(model_or_state_dict))
    else:
        state = {k.removeprefix("module."): v for k, v in model_or_state_dict.items()}
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    state = fit_state_dict(reference_shapes(name), state, f"export of {name}")
    model_cfg = open_clip.get_model_config(name)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or _default_preprocess(name)}

    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / EXPORT_WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_atomic(out_dir / f"{Path(name).name}.json",
                  lambda p: p.write_text(json.dumps(model_cfg, indent=2) + "\n"))
    write_atomic(out_dir / EXPORT_CONFIG_FILE,
                  lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def _default_preprocess(name: str) -> dict:
    with torch.device("meta"):
        return dict(open_clip.get_model_preprocess_cfg(open_clip.create_model(name, device="meta")))


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` then rename over `path`: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
