"""`clip-inherit` / `python -m training.inheritance`: write an inherited-weight checkpoint.

    clip-inherit --teacher ViT-B-32 --teacher-pretrained /data/vit_b_32.safetensors \\
        --student TinyCLIP-ViT-61M-32-Text-29M --out runs/inherit-61m \\
        --depth interval --width activation --data '/data/shards/train-{000000..000009}.tar'

writes runs/inherit-61m/student.safetensors and inheritance.json (record.py); a training run
starts from it with `model.student_init=runs/inherit-61m/student.safetensors`. Rerunning with
the same inputs prints "up to date" and does nothing.

--width: front (TinyCLIP's slicing), weight-norm (importance by weight norms, no data), or
activation (importance by activation statistics on --batches batches of --data shards).
--depth: uniform (the default) or interval (TinyCLIP's rule: `--depth interval --width front`
reproduces TinyCLIP's manual inheritance), or first. docs/inheritance.md says why.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..specs import model_spec
from .inherit import WIDTH_CHOICES, InheritRequest, check_request, inherit
from .manual import DEPTH_RULES
from .record import file_sha256, is_up_to_date, weights_file_of, write_checkpoint

log = logging.getLogger("clip-inherit")


def _inputs(req: InheritRequest) -> dict:
    """The record's inputs: names resolved to configs and weight files to hashes."""
    weights = weights_file_of(req.teacher_pretrained) or weights_file_of(req.teacher)
    return {
        "teacher": {"model": req.teacher, "pretrained": req.teacher_pretrained,
                    "model_cfg": model_spec(req.teacher).model_cfg,
                    "weights_sha256": file_sha256(weights) if weights else None},
        "student": {"model": req.student, "model_cfg": model_spec(req.student).model_cfg},
        "method": {"depth": req.depth, "width": req.width,
                   "data": req.data if req.width == "activation" else None,
                   "batches": req.batches if req.width == "activation" else None,
                   "batch_size": req.batch_size if req.width == "activation" else None},
    }


def run_inherit(req: InheritRequest) -> Path:
    """Inherit and write the checkpoint (or skip when up to date); returns the weights path."""
    check_request(req)
    inputs = _inputs(req)
    out = Path(req.out)
    if is_up_to_date(out, inputs):
        log.info(f"{out}: up to date, nothing to do")
        return out / "student.safetensors"
    state, plan, counts = inherit(req)
    weights = write_checkpoint(out, state, inputs, {"mapping": plan.to_json(), "param_counts": counts})
    log.info(f"{weights}: student {counts['student']} from teacher {counts['teacher']}")
    return weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-inherit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="open_clip name, JSON config or local-dir:DIR")
    p.add_argument("--teacher-pretrained", help="state-dict file or open_clip tag")
    p.add_argument("--student", required=True, help="open_clip name or JSON config")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--depth", default="uniform", choices=DEPTH_RULES,
                   help="which teacher layers the student's layers copy (default: %(default)s, "
                        "spread evenly from first to last). 'interval' is TinyCLIP's rule: use "
                        "it (with --width front) to reproduce TinyCLIP's manual inheritance and "
                        "compare with its model zoo. docs/inheritance.md")
    p.add_argument("--width", default="front", choices=WIDTH_CHOICES,
                   help="which heads/channels are kept (default: %(default)s, TinyCLIP's "
                        "slicing)")
    p.add_argument("--data", help="shard spec for --width activation")
    p.add_argument("--batches", type=int, default=4,
                   help="batches of --data for --width activation (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="batch size of those batches (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    req = InheritRequest(**vars(args))
    try:
        run_inherit(req)
    except ValueError as err:  # expected bad input: one line, no traceback
        print(f"clip-inherit: error: {err}", file=sys.stderr)
        return 2
    return 0
