"""Reading checkpoint folders offline (no process group, no engine): the one place that knows
DeepSpeed's file layout.

    tag_dir = find_tag_dir("runs/x")          # RUN_DIR, RUN_DIR/checkpoints or a tag folder
    record = read_run_record(tag_dir)         # our run.json: config, world size, ZeRO stage, step
    state = read_module_state(tag_dir)        # the task module's full fp32 state dict

Used by the resume check (training/checkpoint.py), `clip-train --export` and each run's export
(training/export.py), and `clip-eval` on a run directory (training/evaluation/loading.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

LATEST = "latest"  # RUN_DIR/checkpoints/latest: the newest complete tag
RUN_RECORD = "run.json"  # RUN_DIR/checkpoints/<tag>/run.json, written by us
FORMAT_VERSION = 3  # of our checkpoints (2: the task module, named client-state parts, run.json;
#                    3: the data position as a global sample count, the global batch and lanes)
# DeepSpeed's file holding the module (and, at ZeRO-3, rank 0's share of it).
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def read_latest(checkpoint_dir: str | os.PathLike) -> Optional[str]:
    """The tag `latest` names, or None when no checkpoint was ever completed."""
    path = os.path.join(checkpoint_dir, LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise FileNotFoundError(f"{path} names {tag!r}, which does not exist")
    return tag


def find_tag_dir(path: str | os.PathLike) -> Path:
    """RUN_DIR -> RUN_DIR/checkpoints/<latest>; RUN_DIR/checkpoints -> <latest>; a tag as is."""
    path = Path(path)
    for checkpoints in (path / "checkpoints", path):
        if (checkpoints / LATEST).is_file():
            return checkpoints / read_latest(checkpoints)
    if (path / RUN_RECORD).is_file():
        return path
    raise ValueError(f"checkpoint {path}: not a run directory (no checkpoints/{LATEST}) and not "
                     f"a checkpoint tag folder (no {RUN_RECORD})")


def read_run_record(tag_dir: str | os.PathLike) -> dict:
    """The tag's run.json (our JSON record of the run that wrote it)."""
    path = Path(tag_dir) / RUN_RECORD
    if not path.is_file():
        raise ValueError(f"{tag_dir}: no {RUN_RECORD}: not a checkpoint of this trainer, or one "
                         f"written before checkpoint format {FORMAT_VERSION}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_module_state(tag_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The engine module's full state dict in fp32, from a tag folder's files.

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer files: DeepSpeed's
    zero_to_fp32 consolidates them (the engine's 16-bit gather would lose bf16 precision).
    ZeRO-0 stores the whole module in the model-states file (in the training precision).
    """
    tag_dir = Path(tag_dir)
    if read_run_record(tag_dir)["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        files = [tag_dir / name for name in MODEL_STATES_FILES if (tag_dir / name).is_file()]
        if not files:
            raise ValueError(f"{tag_dir}: no {MODEL_STATES_FILES[0]}")
        # DeepSpeed's own file (config dicts, shapes besides tensors): not weights_only-loadable.
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k.removeprefix("module."): v.float() for k, v in state.items()}
