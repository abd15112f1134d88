"""Load any model this project writes, or any open_clip model, for evaluation.

`checkpoint` may be:
- an exported open_clip folder (open_clip_config.json + weights): the spec `local-dir:DIR`;
- another kind's export folder (e.g. a two-tower student's student.json + weights,
  training/students/spec.py): that kind's spec, which loads the weights itself;
- a training run directory (RUN_DIR/checkpoints/latest names a DeepSpeed tag) or one tag
  folder RUN_DIR/checkpoints/<tag>: the model spec comes from the tag's run.json
  (`config.model.student`) unless `model` is given; the weights are the student's part of the
  task module's fp32 state (training.checkpoint_files: zero_to_fp32 for ZeRO 1-3, the module
  state for ZeRO-0);
- a state-dict file (.safetensors/.pt/.pth/.bin) with `model` = an open_clip name or a JSON
  model config (open_clip models with a local pretrained file are this case);
- None: `model` with random weights (model cost needs no weights).

The returned spec is the model's one source of preprocessing and tokenizer (`spec.tokenizer`,
`spec.preprocess_cfg`): evaluation tokenizes with the model's own vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from training.checkpoint_files import (NotACheckpoint, find_tag_dir, read_module_state,
                                       read_run_record)
from training.models import (EXPORT_CONFIG_FILE, STATE_DICT_SUFFIXES, load_state_dict_file,
                             load_strict)
from training.specs import ModelSpec, export_folder_spec, model_spec
from training.task import DistillationTask


@dataclass
class LoadedModel:
    model: torch.nn.Module     # eval mode, on the requested device
    name: str                  # open_clip name (or local-dir:DIR) it was built as
    source: str                # what the weights came from, for the record
    spec: ModelSpec            # the model's spec: its tokenizer and preprocessing


def load_for_eval(checkpoint: str | None, model: str | None = None, device: str = "cpu"
                  ) -> LoadedModel:
    """Build and fill the model; every bad input fails with one line naming the path or key."""
    path = Path(checkpoint) if checkpoint else None
    if path is not None and not path.exists():
        raise ValueError(f"checkpoint {path} not found")
    if path is not None and path.is_dir() and (path / EXPORT_CONFIG_FILE).is_file():
        return _finish(model_spec(f"local-dir:{path}"), None, str(path), device)
    if path is not None and path.is_dir() and (spec := export_folder_spec(path)) is not None:
        return _finish(spec, None, str(path), device)  # another kind's export (weights inside)
    if path is not None and path.is_dir():
        try:
            tag_dir = find_tag_dir(path)
        except NotACheckpoint:
            raise ValueError(f"checkpoint {path}: not an open_clip export (no "
                             f"{EXPORT_CONFIG_FILE}), not a run directory (no checkpoints/latest) "
                             f"and not a checkpoint tag folder") from None
        spec = model_spec(model or _student_of_run(tag_dir))
        state = DistillationTask.student_state(read_module_state(tag_dir))
        return _finish(spec, state, str(tag_dir), device)
    if model is None:
        raise ValueError("--model is required (an open_clip name or a JSON model config) "
                         "unless the checkpoint is an export folder or a run directory")
    spec = model_spec(model)
    if path is None:
        return _finish(spec, None, "random init", device)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise ValueError(f"checkpoint {path}: expected a folder or a state-dict file "
                         f"({', '.join(STATE_DICT_SUFFIXES)})")
    return _finish(spec, load_state_dict_file(path), str(path), device)


def _student_of_run(tag_dir: Path) -> str:
    """The run's student spec, from the tag's run.json (the resolved train config)."""
    try:
        student = read_run_record(tag_dir)["config"]["model"]["student"]
    except (KeyError, TypeError):
        student = None
    if not student:
        raise ValueError(f"{tag_dir}: run.json names no config.model.student; "
                         f"pass --model NAME_OR_JSON")
    return str(student)


def _finish(spec: ModelSpec, state: dict[str, torch.Tensor] | None, source: str, device: str
            ) -> LoadedModel:
    net = spec.build()
    if state is not None:
        load_strict(net, state, f"checkpoint {source}")
    net = net.to(device).eval().requires_grad_(False)
    return LoadedModel(model=net, name=spec.name, source=source, spec=spec)
