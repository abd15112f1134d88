"""The composed two-tower student: a vision tower + head, a text tower + head, a logit scale.

    model = build_two_tower(cfg, base_dir)            # cfg: the model JSON (docs/students.md)
    out = model(images, ids)   # image_features, text_features (L2-normalised), logit_scale (exp)

It behaves like an open_clip CLIP wherever the project looks: `encode_image` /
`encode_text(x, normalize=)`, `forward(image, text)` returning open_clip's output dict (either
input may be None), `visual` (the image tower with its head: its parameters are the "image"
parameters of training/evaluation/cost.py) with `image_size`, `context_length`,
`set_grad_checkpointing`. So the trainer, the losses, evaluation and exports treat it as any
student.

Towers (`vision.tower`, `text.tower`): `timm` (training/students/vision.py), `hf_bert`
(hf_text.py), `lite_transformer` (lite_transformer.py). Heads per tower: heads.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.students.heads import build_head
from training.students.hf_text import BertTower
from training.students.lite_transformer import LiteTransformer
from training.students.vision import TimmTower

VISION_TOWERS = ("timm",)
TEXT_TOWERS = ("hf_bert", "lite_transformer")
TEXT_TOWER_KEYS = {"lite_transformer": ("width", "layers", "heads", "kernel_size", "mlp_ratio")}


class VisionEncoder(nn.Module):
    def __init__(self, tower: nn.Module, head: nn.Module):
        super().__init__()
        self.tower, self.head = tower, head
        self.image_size = tower.image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(images))


class TextEncoder(nn.Module):
    def __init__(self, tower: nn.Module, head: nn.Module, pad_id: int):
        super().__init__()
        self.tower, self.head, self.pad_id = tower, head, pad_id
        self.context_length = tower.context_length

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens, mask = self.tower(ids, self.pad_id)
        return self.head(tokens, mask)


class TwoTowerCLIP(nn.Module):
    def __init__(self, visual: VisionEncoder, text: TextEncoder, init_logit_scale: float):
        super().__init__()
        self.visual, self.text = visual, text
        self.context_length = text.context_length
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(ids)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        out = {"logit_scale": self.logit_scale.exp()}
        if image is not None:
            out["image_features"] = self.encode_image(image, normalize=True)
        if text is not None:
            out["text_features"] = self.encode_text(text, normalize=True)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.tower.set_grad_checkpointing(enable)
        self.text.tower.set_grad_checkpointing(enable)


def build_two_tower(cfg: dict, base_dir: Path, pad_id: int, vocab_size: int,
                    load_pretrained: bool = True) -> TwoTowerCLIP:
    """The model a two-tower JSON describes (random weights; the vision trunk from
    `vision.pretrained_file` when given and `load_pretrained`)."""
    embed_dim = int(cfg["embed_dim"])
    vision_cfg, text_cfg = cfg["vision"], cfg["text"]
    if vision_cfg.get("tower", "timm") not in VISION_TOWERS:
        raise ValueError(f"vision.tower {vision_cfg.get('tower')!r}: expected one of "
                         f"{', '.join(VISION_TOWERS)}")
    pretrained = vision_cfg.get("pretrained_file") if load_pretrained else None
    vision = TimmTower(vision_cfg["model_name"], int(vision_cfg.get("image_size", 224)),
                       str(Path(base_dir) / pretrained) if pretrained else None,
                       vision_cfg.get("model_args"))
    visual = VisionEncoder(vision, build_head(vision_cfg.get("head", {}), vision.out_dim,
                                              embed_dim, tokens=False))
    context = int(text_cfg.get("context_length", 77))
    kind = text_cfg.get("tower")
    if kind == "hf_bert":
        tower = BertTower(text_cfg.get("config", {}), vocab_size, context)
    elif kind == "lite_transformer":
        tower = LiteTransformer(vocab_size, context, **{k: text_cfg[k] for k in
                                                       TEXT_TOWER_KEYS[kind] if k in text_cfg})
    else:
        raise ValueError(f"text.tower {kind!r}: expected one of {', '.join(TEXT_TOWERS)}")
    text = TextEncoder(tower, build_head(text_cfg.get("head", {}), tower.out_dim, embed_dim,
                                         tokens=True), pad_id)
    return TwoTowerCLIP(visual, text, cfg.get("init_logit_scale", math.log(1 / 0.07)))
