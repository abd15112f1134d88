"""Reading checkpoint folders offline (no process group, no engine): the one place that knows
DeepSpeed's file layout.

    tag_dir = find_tag_dir("runs/x")          # RUN_DIR, RUN_DIR/checkpoints or a tag folder
    record = read_run_record(tag_dir)         # our run.json: config, world size, ZeRO stage, step
    state = read_module_state(tag_dir)        # the task module's full fp32 state dict

Used by the resume check (training/checkpoint.py), `clip-train --export` and each run's export
(training/export.py), and `clip-eval` on a run directory (training/evaluation/loading.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

LATEST = "latest"  # RUN_DIR/checkpoints/latest: the newest complete tag
RUN_RECORD = "run.json"  # RUN_DIR/checkpoints/<tag>/run.json, written by us
FORMAT_VERSION = 3  # of our checkpoints (2: the task module, named client-state parts, run.json;
#                    3: the data position as a global sample count, the global batch and lanes)
MANIFEST = "manifest.json"  # RUN_DIR/checkpoints/<tag>/manifest.json: every file's size and sha256
# The only classes (besides tensors and plain containers) a checkpoint of this trainer holds: what
# DeepSpeed pickles into its optimizer files. Loading anything else is refused (it could run code).
DEEPSPEED_GLOBALS = ("deepspeed.utils.tensor_fragment.fragment_address",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     # fp16 (GPU) runs: the dynamic loss scaler's state (seen on an H200)
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")
_TAG_RE = re.compile(r"^step-(\d+)$")
# DeepSpeed's file holding the module (and, at ZeRO-3, rank 0's share of it).
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class NotACheckpoint(ValueError):
    """The path is no run directory or checkpoint tag folder at all (other ValueErrors: it is
    one, but damaged or refused)."""


def step_of(tag: str) -> Optional[int]:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- safe loading

def weights_only_loads() -> None:
    """Make every torch.load in this process weights_only (ours, and DeepSpeed's checkpoint
    engine, zero_to_fp32 and ds_to_universal, which ask for full unpickling), allowing only
    DeepSpeed's own classes listed in DEEPSPEED_GLOBALS: no file can run code when loaded."""
    import importlib
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    allowed = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    torch.serialization.add_safe_globals(allowed)


def check_loadable(path: str | os.PathLike) -> None:
    """ValueError in one line if the torch file `path` needs any class besides tensors, plain
    containers and DEEPSPEED_GLOBALS (read from its pickle opcodes; nothing runs)."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a torch zip file, truncated, ...
        raise ValueError(f"{path}: not a readable torch file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    refused = sorted(set(unsafe) - set(DEEPSPEED_GLOBALS))
    if refused:
        raise ValueError(f"{path}: refused: loading it needs {', '.join(refused)}, which no "
                         f"checkpoint of this trainer holds (unpickling it could run code)")


def safe_load(path: str | os.PathLike) -> dict:
    """torch.load of one checkpoint file, weights_only (see check_loadable)."""
    check_loadable(path)
    weights_only_loads()
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- the manifest

def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tag_files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def manifest_of(tag_dir: str | os.PathLike) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file in the tag folder."""
    tag_dir = Path(tag_dir)
    return {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in _tag_files(tag_dir)}


# Tags verified in this process, keyed by every file's (name, size, mtime): finding a run's tag
# and then reading it (clip-eval, --export, the run's own export) verify once, not twice; a file
# written since changes its key and is verified again.
_VERIFIED: set[tuple] = set()


def _signature(tag_dir: Path) -> tuple:
    stats = [(str(p.relative_to(tag_dir)), p.stat()) for p in tag_dir.rglob("*") if p.is_file()]
    return (str(tag_dir.resolve()),) + tuple(sorted((n, s.st_size, s.st_mtime_ns) for n, s in stats))


def verify_tag(tag_dir: str | os.PathLike) -> None:
    """ValueError in one line unless the tag is complete: its manifest lists exactly its files
    with their sizes and checksums, and every torch file in it loads weights_only (hashing every
    file: done once per process for unchanged files)."""
    tag_dir = Path(tag_dir)
    signature = _signature(tag_dir) if tag_dir.is_dir() else None
    if signature in _VERIFIED:
        return
    _verify(tag_dir)
    _VERIFIED.add(signature)


def _verify(tag_dir: Path) -> None:
    path = tag_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{tag_dir}: incomplete checkpoint (no {MANIFEST}: its save did not "
                         f"finish)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    files = {str(p.relative_to(tag_dir)) for p in _tag_files(tag_dir)}
    if files != set(manifest):
        missing, extra = sorted(set(manifest) - files), sorted(files - set(manifest))
        raise ValueError(f"{tag_dir}: files differ from its {MANIFEST} (missing {missing}, "
                         f"not listed {extra})")
    for name, entry in manifest.items():
        file = tag_dir / name
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise ValueError(f"{file}: corrupt checkpoint file (size or sha256 differs from "
                             f"{path})")
        if file.suffix == ".pt":
            check_loadable(file)


# --------------------------------------------------------------------------- finding the tag

def read_latest(checkpoint_dir: str | os.PathLike) -> Optional[str]:
    """The newest complete tag: the one `latest` names if it verifies, else (with a warning) the
    newest tag that does; None when no checkpoint was ever completed. ValueError (one line) when
    checkpoints were completed but none verifies: never a silent restart from step 0."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / LATEST
    named, problem = None, None
    if path.is_file():
        try:
            named = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            problem = f"unreadable ({err})"
        else:
            if step_of(named) is None:
                problem = f"names {named!r}, not a checkpoint tag"
            else:
                try:
                    verify_tag(checkpoint_dir / named)
                    return named
                except (ValueError, OSError) as err:
                    problem = f"names {named!r}: {err}"
    tags = sorted((p.name for p in checkpoint_dir.iterdir() if p.is_dir() and step_of(p.name)
                   is not None), key=step_of, reverse=True) if checkpoint_dir.is_dir() else []
    completed = path.is_file() or any((checkpoint_dir / t / MANIFEST).is_file() for t in tags)
    for tag in tags:
        try:
            verify_tag(checkpoint_dir / tag)
        except (ValueError, OSError):
            continue
        log.warning(f"{path} {problem or 'is missing'}: resuming from {tag}, the newest complete "
                    f"checkpoint")
        return tag
    if completed:
        raise ValueError(f"{checkpoint_dir}: no complete checkpoint ({path} "
                         f"{problem or 'is missing'}; {len(tags)} tag folder(s), none verifies "
                         f"against its {MANIFEST}); refusing to restart from step 0: restore a "
                         f"checkpoint or use a new run_dir")
    return None


def find_tag_dir(path: str | os.PathLike) -> Path:
    """RUN_DIR -> its newest complete checkpoint; RUN_DIR/checkpoints -> the same; a tag as is."""
    path = Path(path)
    for checkpoints in (path / "checkpoints", path):
        if (checkpoints / LATEST).is_file():
            return checkpoints / read_latest(checkpoints)
    if (path / RUN_RECORD).is_file():
        verify_tag(path)
        return path
    raise NotACheckpoint(f"checkpoint {path}: not a run directory (no checkpoints/{LATEST}) and "
                         f"not a checkpoint tag folder (no {RUN_RECORD})")


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
    Frozen parameters (a LiT student's text tower) are not in the optimizer files, and DeepSpeed
    records them for zero_to_fp32 only from ZeRO-2: at ZeRO-1 they come from the model-states
    file, which holds the whole module there.
    """
    tag_dir = Path(tag_dir)
    verify_tag(tag_dir)
    files = [tag_dir / name for name in MODEL_STATES_FILES if (tag_dir / name).is_file()]
    if not files:
        raise ValueError(f"{tag_dir}: no {MODEL_STATES_FILES[0]}")
    state = safe_load(files[0])["module"]
    if read_run_record(tag_dir)["zero_stage"] > 0:
        weights_only_loads()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = {**state, **get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent),
                                                                      tag=tag_dir.name)}
    return {k.removeprefix("module."): v.float() for k, v in state.items()}
