"""Load any model this project writes, or any open_clip model, for evaluation.

`checkpoint` may be:
- an exported open_clip folder (open_clip_config.json + weights): `create_model("local-dir:DIR")`;
- a training run directory (RUN_DIR/checkpoints/latest names a DeepSpeed tag) or one tag
  folder RUN_DIR/checkpoints/<tag>: the model name comes from RUN_DIR/config.yaml
  (`model.student`) unless `model` is given; the weights are the fp32 master weights
  (DeepSpeed's zero_to_fp32 for ZeRO 1-3, the module state for ZeRO-0);
- a state-dict file (.safetensors/.pt/.pth/.bin) with `model` = an open_clip name or a JSON
  model config (open_clip models with a local pretrained file are this case);
- None: `model` with random weights (model cost needs no weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from training.checkpoint import read_latest
from training.models import (EXPORT_CONFIG_FILE, STATE_DICT_SUFFIXES, load_state_dict_file,
                             load_strict, resolve_model_name)


@dataclass
class LoadedModel:
    model: torch.nn.Module     # eval mode, on the requested device
    name: str                  # open_clip name (or local-dir:DIR) it was built as
    source: str                # what the weights came from, for the record


def load_for_eval(checkpoint: str | None, model: str | None = None, device: str = "cpu"
                  ) -> LoadedModel:
    """Build and fill the model; every bad input fails with one line naming the path or key."""
    path = Path(checkpoint) if checkpoint else None
    if path is not None and not path.exists():
        raise ValueError(f"checkpoint {path} not found")
    if path is not None and path.is_dir() and (path / EXPORT_CONFIG_FILE).is_file():
        name = resolve_model_name(f"local-dir:{path}")
        return _finish(open_clip.create_model(name), name, str(path), device)
    if path is not None and path.is_dir():
        tag_dir = _deepspeed_tag_dir(path)
        name = resolve_model_name(model or _student_from_run_config(tag_dir.parent.parent))
        net = open_clip.create_model(name)
        load_strict(net, _deepspeed_state_dict(tag_dir), f"checkpoint {tag_dir}")
        return _finish(net, name, str(tag_dir), device)
    if model is None:
        raise ValueError("--model is required (an open_clip name or a JSON model config) "
                         "unless the checkpoint is an export folder or a run directory")
    name = resolve_model_name(model)
    net = open_clip.create_model(name)
    if path is None:
        return _finish(net, name, "random init", device)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise ValueError(f"checkpoint {path}: expected a folder or a state-dict file "
                         f"({', '.join(STATE_DICT_SUFFIXES)})")
    load_strict(net, load_state_dict_file(path), f"checkpoint {path}")
    return _finish(net, name, str(path), device)


def _finish(net: torch.nn.Module, name: str, source: str, device: str) -> LoadedModel:
    return LoadedModel(net.to(device).eval().requires_grad_(False), name, source)


def _deepspeed_tag_dir(path: Path) -> Path:
    """RUN_DIR -> RUN_DIR/checkpoints/<latest>; RUN_DIR/checkpoints -> <latest>; a tag dir as is."""
    for checkpoints in (path / "checkpoints", path):
        if (checkpoints / "latest").is_file():
            return checkpoints / read_latest(str(checkpoints))
    if any(path.glob("*model_states.pt")):
        return path
    raise ValueError(f"checkpoint {path}: not an open_clip export (no {EXPORT_CONFIG_FILE}), "
                     f"not a run directory (no checkpoints/latest) and not a DeepSpeed tag folder")


def _student_from_run_config(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{config} not found: pass --model NAME_OR_JSON")
    from omegaconf import OmegaConf
    student = OmegaConf.select(OmegaConf.load(config), "model.student")
    if not student:
        raise ValueError(f"{config}: no model.student; pass --model NAME_OR_JSON")
    return str(student)


def _deepspeed_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed tag folder (ZeRO 1-3 partitions merged; ZeRO-0 module)."""
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            return _student_only(get_fp32_state_dict_from_zero_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name))
        except ValueError:
            pass  # a ZeRO-0 checkpoint also has optimizer files: fall back to the module state
    model_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise ValueError(f"{tag_dir}: no mp_rank_*_model_states.pt")
    state = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    return _student_only(state)


def _student_only(state: dict) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes; drop the trainer's feature-distillation projection (not CLIP's)."""
    state = {k.removeprefix("module."): v.float() for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("distill_projection.")}
