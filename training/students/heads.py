"""Projection heads: a tower's features -> the shared embedding, chosen per tower in the model JSON.

    head = build_head({"kind": "convffn", "hidden": 512}, in_dim=384, embed_dim=512, tokens=True)
    embedding = head(tokens, mask)     # tokens [B, L, 384], mask [B, L] (True = a real token)

Kinds:
- `linear`: one Linear (no bias, as CLIP's projections);
- `mlp`: Linear -> ReLU -> Dropout -> Linear (Mobile CLIP's lightweight heads; dropout 0.1);
- `convffn` (text towers only): Linear -> depthwise 1-D convolution over the tokens -> GELU ->
  Dropout -> mask-aware mean pool -> Linear -> LayerNorm (TinyCLIP-ConvFFN's text head).
On a text tower, `linear` and `mlp` first pool the tokens (`pool`: `mean` over real tokens,
`first` = [CLS], or `last` = the last real token, CLIP's end-of-text position); `convffn` pools
after its convolution. The mask comes from the tokenizer's pad id, and padding never reaches a
real token: padded positions are zeroed before the convolution, whose zero padding then sees the
same zeros, so an embedding does not depend on how much padding follows the caption.
"""
from __future__ import annotations

import torch
from torch import nn

HEAD_KINDS = ("linear", "mlp", "convffn")
POOLS = ("mean", "first", "last")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: [B, L, D], [B, L] -> [B, D]."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return masked_mean(tokens, mask)
    if how == "first":
        return tokens[:, 0]
    last = mask.long().sum(1).clamp_min(1) - 1  # padding only ever follows the caption
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]


class MlpHead(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.1):
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


class ConvFFNHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, kernel_size: int = 3,
                 dropout: float = 0.1):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"convffn kernel_size {kernel_size}: must be odd (same length out)")
        self.fc_in = nn.Linear(in_dim, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2,
                              groups=hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc_out = nn.Linear(hidden, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.fc_in(tokens) * mask.unsqueeze(-1).to(tokens.dtype)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.drop(self.act(x))
        return self.norm(self.fc_out(masked_mean(x, mask)))


class PooledHead(nn.Module):
    """A vector head on a token tower: pool, then project."""

    def __init__(self, head: nn.Module, pool: str):
        super().__init__()
        self.head, self.pool = head, pool

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(pool_tokens(tokens, mask, self.pool))


def build_head(cfg: dict, in_dim: int, embed_dim: int, tokens: bool) -> nn.Module:
    """The head a tower's `head` entry names; `tokens`: the tower yields tokens + mask."""
    kind = cfg.get("kind", "linear")
    hidden = int(cfg.get("hidden", 2 * embed_dim))
    dropout = float(cfg.get("dropout", 0.1))
    if kind == "linear":
        head = nn.Linear(in_dim, embed_dim, bias=False)
    elif kind == "mlp":
        head = MlpHead(in_dim, hidden, embed_dim, dropout)
    elif kind == "convffn":
        if not tokens:
            raise ValueError("head kind convffn needs a token sequence: use it on a text tower")
        return ConvFFNHead(in_dim, hidden, embed_dim, int(cfg.get("kernel_size", 3)), dropout)
    else:
        raise ValueError(f"head kind {kind!r}: expected one of {', '.join(HEAD_KINDS)}")
    if not tokens:
        return head
    pool = cfg.get("pool", "mean")
    if pool not in POOLS:
        raise ValueError(f"head pool {pool!r}: expected one of {', '.join(POOLS)}")
    return PooledHead(head, pool)
