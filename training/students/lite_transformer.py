"""A small Lite Transformer text encoder: Long-Short Range Attention (Wu et al., ICLR 2020).

    tower = LiteTransformer(vocab_size=49408, context_length=77, width=256, layers=4, heads=4)
    tokens, mask = tower(ids, pad_id)    # [B, L, 256], [B, L]

Each block splits the channels in two: one half goes through multi-head self-attention (the
global, long-range branch), the other through a convolution branch (GLU, then a depthwise 1-D
convolution over the tokens: the local, short-range branch); the halves are concatenated and
mixed by a Linear, then a feed-forward layer follows (pre-norm residuals throughout).

Written here in torch because no maintained library ships it: the paper's code is a fairseq fork
(mit-han-lab/lite-transformer, unmaintained, with CUDA-only lightweight/dynamic convolutions);
timm and transformers have no LSRA block. The convolution branch uses a plain depthwise
convolution (the paper's lightweight convolution without weight sharing across heads).

Padding: attention ignores padded keys, and padded positions are zeroed before each
convolution, so a real token's output does not depend on how much padding follows it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LongShortRangeAttention(nn.Module):
    def __init__(self, width: int, heads: int, kernel_size: int):
        super().__init__()
        if width % 2 or (width // 2) % heads:
            raise ValueError(f"lite transformer width {width}: half of it must divide into "
                             f"{heads} heads")
        half = width // 2
        self.heads = heads
        self.qkv = nn.Linear(half, 3 * half)
        self.attn_out = nn.Linear(half, half)
        self.glu_in = nn.Linear(half, 2 * half)
        self.conv = nn.Conv1d(half, half, kernel_size, padding=kernel_size // 2, groups=half)
        self.conv_out = nn.Linear(half, half)
        self.mix = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        long, short = x.chunk(2, dim=-1)
        batch, length, half = long.shape
        q, k, v = (t.view(batch, length, self.heads, half // self.heads).transpose(1, 2)
                   for t in self.qkv(long).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        long = self.attn_out(attended.transpose(1, 2).reshape(batch, length, half))
        short = F.glu(self.glu_in(short), dim=-1) * mask.unsqueeze(-1).to(x.dtype)
        short = self.conv_out(self.conv(short.transpose(1, 2)).transpose(1, 2))
        return self.mix(torch.cat([long, short], dim=-1))


class LiteBlock(nn.Module):
    def __init__(self, width: int, heads: int, kernel_size: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.lsra = LongShortRangeAttention(width, heads, kernel_size)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.lsra(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class LiteTransformer(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int = 256, layers: int = 4,
                 heads: int = 4, kernel_size: int = 7, mlp_ratio: float = 2.0):
        super().__init__()
        self.context_length = context_length
        self.out_dim = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(LiteBlock(width, heads, kernel_size, mlp_ratio)
                                    for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ids != pad_id
        mask = mask | ~mask.any(1, keepdim=True)  # an all-padding row (cost's dummy ids): no NaN
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.ln_final(x), mask

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
