"""The inherited-weight checkpoint: a safetensors state dict plus a JSON provenance record.

    OUT/student.safetensors   the student's full state dict (open_clip shapes; loads strictly
                              into `build_student(student, init_state_dict=...)`)
    OUT/inheritance.json      the record: teacher (name, pretrained tag or file, sha256), student
                              config, method, the mapping (teacher layers and units kept),
                              parameter counts, the state dict's sha256, and `inputs_sha256`

Both are written atomically (temp file + rename), the state dict first and the record last, so
a record exists only next to the complete weights it describes. `inputs_sha256` hashes
everything that determines the result; `is_up_to_date` compares it, which makes rerunning the
same inheritance (e.g. a requeued job) a no-op.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from training.files import write_atomic, write_json_atomic
from training.models import EXPORT_WEIGHTS_FILE

RECORD_FILE = "inheritance.json"
WEIGHTS_FILE = "student.safetensors"
RECORD_FORMAT = 1


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_file_of(source: str | None) -> Path | None:
    """The file holding a teacher's weights: a state-dict file, or a local-dir export's weights."""
    if source is None:
        return None
    if source.startswith("local-dir:"):
        folder = Path(source[len("local-dir:"):])
        for name in (EXPORT_WEIGHTS_FILE, "open_clip_pytorch_model.bin"):
            if (folder / name).is_file():
                return folder / name
        return None
    path = Path(source)
    return path if path.is_file() else None


def inputs_sha256(inputs: dict) -> str:
    """Hash of the canonical JSON of everything that determines the inherited weights."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def is_up_to_date(out_dir: str | os.PathLike, inputs: dict) -> bool:
    """True when OUT holds a record for exactly these inputs and its intact weights file."""
    out_dir = Path(out_dir)
    record_path, weights = out_dir / RECORD_FILE, out_dir / WEIGHTS_FILE
    if not (record_path.is_file() and weights.is_file()):
        return False
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (record.get("inputs_sha256") == inputs_sha256(inputs)
            and record.get("weights", {}).get("sha256") == file_sha256(weights))


def write_checkpoint(out_dir: str | os.PathLike, state: dict[str, torch.Tensor], inputs: dict,
                     details: dict) -> Path:
    """Write weights then record; returns the weights path. `details` joins the record as is."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_atomic(weights, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    record = {
        "format": RECORD_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": inputs,
        "inputs_sha256": inputs_sha256(inputs),
        "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(weights),
                    "tensors": len(state), "numel": sum(v.numel() for v in state.values())},
        **details,
    }
    write_json_atomic(out_dir / RECORD_FILE, record)
    return weights
