"""Vision towers from timm: any timm model as the trunk, pooled features out, never a download.

    tower = TimmTower("mobilenetv3_large_100", image_size=224, pretrained_file="mnv3.safetensors")
    features = tower(images)      # [B, tower.out_dim]

The trunk is built with `pretrained=False`; a local weights file (timm's own state dict, as
`timm.create_model(name, pretrained=True).state_dict()` or the hub's model.safetensors) is then
loaded strictly into the full timm model, classifier included, before the classifier is dropped:
a file for another model fails in one line naming the keys that do not fit.

Why not open_clip's TimmModel with `"timm_proj": "linear"`: open_clip sizes its projection with
`trunk.num_features` (960 for MobileNetV3-Large), but models whose head adds layers before the
classifier (MobileNetV3's conv_head: 960 -> 1280, timm's `head_hidden_size`) return 1280 features
from `forward_head`, so the Linear(960, embed) fails with "mat1 and mat2 shapes cannot be
multiplied (Bx1280 and 960xE)". Here the width is `head_hidden_size`. In an open_clip JSON the
working form is `"timm_proj": ""`: timm's own classifier, re-sized to embed_dim, is the projection
(configs/models/*MobileNetV3*.json; docs/students.md).
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from training import models


class TimmTower(nn.Module):
    def __init__(self, model_name: str, image_size: int = 224, pretrained_file: str | None = None,
                 model_args: dict | None = None):
        super().__init__()
        if model_name not in timm.list_models():
            raise ValueError(f"vision.model_name {model_name!r}: not a timm model")
        self.image_size = image_size
        self.trunk = timm.create_model(model_name, pretrained=False, **(model_args or {}))
        if pretrained_file is not None:
            models.load_strict(self.trunk, models.load_state_dict_file(pretrained_file),
                               f"vision.pretrained_file {pretrained_file}")
        self.trunk.reset_classifier(0)
        self.out_dim = int(getattr(self.trunk, "head_hidden_size", None)
                           or self.trunk.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


def timm_preprocess(model_name: str, image_size: int) -> dict:
    """open_clip's preprocess keys from timm's pretrained config (mean, std, interpolation)."""
    cfg = timm.get_pretrained_cfg(model_name)
    return {"size": image_size, "mode": "RGB", "mean": list(cfg.mean), "std": list(cfg.std),
            "interpolation": cfg.interpolation if cfg.interpolation in ("bicubic", "bilinear")
            else "bicubic", "resize_mode": "shortest", "fill_color": 0}
