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
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from .. import models
from ..specs import build_student, build_teacher, model_spec
from .importance import activation_scores, weight_norm_scores
from .manual import DEPTH_RULES, InheritancePlan, apply_plan, plan_inheritance
from .record import file_sha256, is_up_to_date, weights_file_of, write_checkpoint

WIDTH_CHOICES = ("front", "weight-norm", "activation")
log = logging.getLogger("clip-inherit")


@dataclass
class InheritRequest:
    """Everything one inheritance depends on (what the record's inputs hash covers)."""
    teacher: str
    student: str
    out: str
    teacher_pretrained: str | None = None
    depth: str = "uniform"
    width: str = "front"
    data: str | None = None
    batches: int = 4
    batch_size: int = 32


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


def _check(req: InheritRequest) -> None:
    """Bad arguments fail here, in one line, before any model is built."""
    if req.depth not in DEPTH_RULES:
        raise ValueError(f"--depth {req.depth!r}: expected one of {', '.join(DEPTH_RULES)}")
    if req.width not in WIDTH_CHOICES:
        raise ValueError(f"--width {req.width!r}: expected one of {', '.join(WIDTH_CHOICES)}")
    if req.width == "activation" and not req.data:
        raise ValueError("--width activation needs --data (a shard spec)")
    if req.batches < 1 or req.batch_size < 1:
        raise ValueError(f"--batches and --batch-size must be >= 1 (got {req.batches}, {req.batch_size})")
    if req.teacher_pretrained and not weights_file_of(req.teacher_pretrained) \
            and Path(req.teacher_pretrained).suffix in models.STATE_DICT_SUFFIXES:
        raise ValueError(f"--teacher-pretrained {req.teacher_pretrained}: file not found")


def _scores(req: InheritRequest, teacher: torch.nn.Module, info) -> dict | None:
    if req.width == "front":
        return None
    if req.width == "weight-norm":
        return weight_norm_scores(teacher)
    # The evaluation reader: every sample once, in shard order, unaugmented (what statistics want).
    from ..evaluation.datasets import build_eval_loader, open_eval_set
    from ..evaluation.suite import eval_transform
    loader = build_eval_loader(open_eval_set(req.data), eval_transform(info.preprocess_cfg),
                               req.batch_size)
    batches = ((b["image"], info.tokenizer([captions[0] for captions in b["captions"]]))
               for b in islice(loader, req.batches) if b["image"] is not None)
    return activation_scores(teacher, batches)


def inherit(req: InheritRequest) -> tuple[dict[str, torch.Tensor], InheritancePlan, dict]:
    """The student's inherited state dict (every tensor filled), the plan and both models'
    parameter counts; nothing is written. Deterministic: the same inputs give the same tensors."""
    teacher, tinfo = build_teacher(req.teacher, req.teacher_pretrained)
    student, _ = build_student(req.student)
    plan = plan_inheritance(teacher, student, req.depth,
                            "front" if req.width == "front" else "importance",
                            _scores(req, teacher, tinfo))
    state = apply_plan(teacher.state_dict(), student, plan)
    models.load_strict(student, state, "inherited state")  # every student tensor filled
    counts = {"teacher": models.tower_param_counts(teacher),
              "student": models.tower_param_counts(student)}
    return state, plan, counts


def inherit_from_teacher(teacher: str, teacher_pretrained: str, student: str
                         ) -> dict[str, torch.Tensor]:
    """`model.student_init: teacher`: the state dict `clip-inherit --teacher T --teacher-pretrained
    P --student S` would write (the default rule: --depth uniform --width front), computed in
    this process. The global RNG is left as it was (building the two models draws from it), so a
    run starting so is the run starting from that file. ValueError (one line) when the student
    cannot inherit from the teacher."""
    req = InheritRequest(teacher=teacher, student=student, out="",
                         teacher_pretrained=teacher_pretrained)
    _check(req)
    with torch.random.fork_rng(devices=[]):
        return inherit(req)[0]


def run_inherit(req: InheritRequest) -> Path:
    """Inherit and write the checkpoint (or skip when up to date); returns the weights path."""
    _check(req)
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
