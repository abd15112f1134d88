"""Pretrained timm weights for an open_clip student with a timm vision tower, from a local file.

    python -m training.students.timm_init KDEOV-CSPDarknet-S cs3darknet_s.safetensors init.safetensors
    # then: model.student_init: init.safetensors  (with lit:KDEOV-CSPDarknet-S too)

open_clip builds `timm_model_name` towers with `pretrained=False` here (its `timm_model_pretrained`
would download). This writes the whole student's state dict: the vision trunk from the timm file
(timm's own state dict for that model, loaded strictly by training/students/vision.py, classifier
dropped), everything else (projection, text tower, logit scale) as the student's random
initialisation under `--seed`. With `"timm_proj": ""` the trunk's classifier IS the projection:
it keeps its random initialisation too.
"""
from __future__ import annotations

import argparse
import sys

import torch

from training import models
from training.specs import model_spec
from training.students.vision import TimmTower


def student_with_timm_trunk(student: str, timm_file: str, seed: int = 0
                            ) -> dict[str, torch.Tensor]:
    spec = model_spec(student)
    vision_cfg = spec.model_cfg.get("vision_cfg", {})
    name = vision_cfg.get("timm_model_name")
    if not name:
        raise ValueError(f"model {student}: its vision_cfg has no timm_model_name")
    torch.manual_seed(seed)
    model = spec.build()
    trunk = model.visual.trunk
    pretrained = TimmTower(name, pretrained_file=timm_file).trunk.state_dict()
    head = trunk.get_classifier()  # an Identity, or the projection with "timm_proj": ""
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    classifier = {key for key, param in trunk.named_parameters() if id(param) in head_ids}
    own = trunk.state_dict()
    models.load_strict(trunk, {**pretrained, **{k: own[k] for k in classifier}},
                       f"timm file {timm_file} into {student}'s vision trunk")
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.students.timm_init",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("student", help="open_clip model name or JSON config with a timm tower")
    parser.add_argument("timm_file", help="timm's state dict for that model (.safetensors/.pt)")
    parser.add_argument("out", help="the student's state dict (.safetensors) for student_init")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        state = student_with_timm_trunk(args.student, args.timm_file, args.seed)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    from safetensors.torch import save_file
    from training.files import write_atomic
    write_atomic(args.out, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    print(f"{args.out}: {len(state)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
