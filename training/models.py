"""The open_clip model library glue: model-config names, state-dict files, the forward, export.

Low layer: no training concepts here. What a student or teacher IS (its spec, tokenizer and
preprocessing) is training/specs.py; building them for a run is training/specs.py's
build_student / build_teacher.

    name = resolve_model_name("configs/models/Tiny-ViT-Student.json")   # registered with open_clip
    load_strict(model, load_state_dict_file("inherited.safetensors"), "student init")
    out = encode(model, images, ids)   # image_features, text_features, logit_scale (0-dim)
    export_open_clip(state_dict, name, "out/")   # open_clip's local-dir: format, strict reload
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import open_clip
import torch
from torch import nn

from training.files import WEIGHT_FILE_SUFFIXES, write_atomic, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_DIR = REPO_ROOT / "configs" / "models"
REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
STATE_DICT_SUFFIXES = WEIGHT_FILE_SUFFIXES
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


# --------------------------------------------------------------------------- sizes

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
    with torch.device("meta"), quiet_random_init():
        reference = open_clip.create_model(model_name, device="meta")
    return {k: v.shape for k, v in reference.state_dict().items()}


def export_open_clip(model_or_state_dict: nn.Module | dict[str, torch.Tensor],
                     model_name: str | os.PathLike, out_dir: str | os.PathLike,
                     preprocess_cfg: dict | None = None, tokenizer_dir: Path | None = None
                     ) -> Path:
    """Write the student in open_clip's format and return `out_dir`.

    Files: open_clip_config.json ({"model_cfg", "preprocess_cfg"}, read by
    `create_model("local-dir:" + out_dir)`), open_clip_model.safetensors (open_clip's shapes:
    0-dim logit_scale) and <name>.json (the bare model config, for `add_model_config` +
    `create_model(name, pretrained=out_dir/open_clip_model.safetensors)`). Accepts a module or a
    state dict (e.g. one consolidated from a ZeRO-3 checkpoint); the state dict is checked against
    the model config before anything is written. A vocabulary file the config names by a path
    relative to its folder (`text_cfg.tokenizer_kwargs.bpe_path`, resolved in `tokenizer_dir`)
    is copied beside the config, so the export's tokenizer is the student's.
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
    bpe = (model_cfg.get("text_cfg", {}).get("tokenizer_kwargs") or {}).get("bpe_path")
    if bpe and not os.path.isabs(bpe) and tokenizer_dir is not None:
        source = Path(tokenizer_dir) / bpe
        if not (out_dir / bpe).resolve().is_relative_to(out_dir.resolve()):
            raise ValueError(f"export of {name}: tokenizer_kwargs.bpe_path {bpe!r} leaves the "
                             f"model's folder")
        if source.resolve() != (out_dir / bpe).resolve():
            (out_dir / bpe).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out_dir / bpe, lambda p: shutil.copyfile(source, p))
    write_json_atomic(out_dir / f"{Path(name).name}.json", model_cfg, indent=2)
    write_json_atomic(out_dir / EXPORT_CONFIG_FILE, config, indent=2)
    return out_dir


def _default_preprocess(name: str) -> dict:
    with torch.device("meta"), quiet_random_init():
        return dict(open_clip.get_model_preprocess_cfg(open_clip.create_model(name, device="meta")))


class _RandomInitNotice(logging.Filter):
    """open_clip logs "No pretrained weights loaded for model ... initialized randomly" for every
    model built without a pretrained tag. Ours are built that way and get their weights after
    (student_init, teacher_pretrained, a checkpoint) or are meant to start random: the line
    would be wrong or noise (11 of them in one clip-stages run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def quiet_random_init():
    root, notice = logging.getLogger(), _RandomInitNotice()
    root.addFilter(notice)  # open_clip logs through the root logger
    try:
        yield
    finally:
        root.removeFilter(notice)
