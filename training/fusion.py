"""KDEOV's cross-modal fusion modules, as optional task heads (`model.fusion`).

    head = build_fusion(FusionConfig(kind="film"), dim=64, out_dim=64)
    out = head({"image_features": ..., "text_features": ...})   # {"fused_image_features": [N, out]}

KDEOV (a frozen CLIP text encoder + a light YOLO-style visual backbone) fuses text and visual
features before its detection head: FiLM (the text predicts a per-channel scale and shift of the
visual features) or cross-attention (visual tokens attend to text tokens). Here there is no
detection head: the fused features are an output entry, `fused_image_features` (L2-normalised,
one row per sample: the image fused with its own caption), that a loss term reads (the
`fused_feature` term, training/objectives/fusion.py: distance to the teacher's image features)
or an evaluation can use. Heads are training-only (not in the export: training/task.py).

Inputs: the pooled `image_features` / `text_features` [N, D], or token-level outputs when the
student provides them (`image_tokens` [N, T, D], `text_tokens` [N, L, D]); cross-attention on
pooled features attends over one text token (a text-conditioned residual). Per-sample in, per-sample
out: feature-cached accumulation stays exact (training/accumulation.py).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from training.config import FusionConfig
from training.task import TaskHead

OUTPUT_KEY = "fused_image_features"


class FiLMFusion(TaskHead):
    """fused = (1 + gamma(text)) * image + beta(text), then a linear map to `out_dim`.
    gamma and beta start at zero, so the head starts as the identity on the image features."""

    def __init__(self, dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.film = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.film[-1].weight)
        nn.init.zeros_(self.film[-1].bias)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.out.weight.dtype
        image = outputs["image_features"].to(dtype)
        gamma, beta = self.film(outputs["text_features"].to(dtype)).chunk(2, dim=-1)
        return {OUTPUT_KEY: F.normalize(self.out((1 + gamma) * image + beta), dim=-1)}


class CrossAttentionFusion(TaskHead):
    """Visual tokens (queries) attend to the text tokens of their own caption (keys, values);
    a residual + LayerNorm, mean over the visual tokens, a linear map to `out_dim`."""

    def __init__(self, dim: int, out_dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    @staticmethod
    def tokens(outputs: Mapping[str, torch.Tensor], kind: str, dtype) -> torch.Tensor:
        tokens = outputs.get(f"{kind}_tokens")
        if tokens is None:
            tokens = outputs[f"{kind}_features"][:, None]  # one token
        return tokens.to(dtype)

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.out.weight.dtype
        image, text = (self.tokens(outputs, kind, dtype) for kind in ("image", "text"))
        attended, _ = self.attention(image, text, text, need_weights=False)
        fused = self.norm(image + attended).mean(dim=1)
        return {OUTPUT_KEY: F.normalize(self.out(fused), dim=-1)}


def build_fusion(cfg: FusionConfig, dim: int, out_dim: int) -> TaskHead:
    """The configured fusion head over `dim`-wide features, output `out_dim` wide (the
    teacher's embedding width when a loss compares it with the teacher)."""
    if cfg.kind == "film":
        return FiLMFusion(dim, out_dim, hidden=cfg.hidden or dim)
    return CrossAttentionFusion(dim, out_dim, heads=cfg.heads)
