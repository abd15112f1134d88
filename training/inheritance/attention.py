"""The one re-implementation of open_clip's self-attention forward (nn.MultiheadAttention with
batch-first inputs), for the three places that need more than the module gives:

- masked_clip.py: per-head L0 gates between the attention and the output projection;
- prune.py: PrunedAttention, whose inner width (heads x head_dim) differs from the residual width;
- importance.py: each head's own output (activation importance).

    o_h = softmax(q_h k_h^T / sqrt(head_dim) + attn_mask) v_h      head_outputs  (n, heads, L, hd)
    out = W_out concat_h(gate_h * o_h) + b_out                     project_heads (n, L, width)

`attn_mask` follows nn.MultiheadAttention: a float mask is added to the scores, a boolean mask is
True where attention is NOT allowed (the opposite of scaled_dot_product_attention's rule).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def head_outputs(x: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: Optional[torch.Tensor],
                 heads: int, head_dim: int, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each head's attention output, (n, heads, length, head_dim), for x of (n, length, width).

    `in_proj_weight` stacks the q, k and v projections (3 x heads x head_dim rows), as
    nn.MultiheadAttention's does."""
    n, length, _ = x.shape
    q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def project_heads(o: torch.Tensor, out_weight: torch.Tensor, out_bias: Optional[torch.Tensor],
                  head_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head outputs (n, heads, length, head_dim), each scaled by its `head_gate` value (one per
    head) if given, concatenated and projected: (n, length, width)."""
    n, heads, length, _ = o.shape
    if head_gate is not None:
        o = o * head_gate.view(1, heads, 1, 1)
    return F.linear(o.transpose(1, 2).reshape(n, length, -1), out_weight, out_bias)


def self_attention(attn: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                   head_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`attn`'s forward on batch-first x, (n, length, width) -> (n, length, width), optionally with
    per-head gates. `attn`: an nn.MultiheadAttention or anything with its attributes
    (in_proj_weight, in_proj_bias, out_proj, num_heads, head_dim). No heads: the output bias."""
    if attn.num_heads == 0:
        return attn.out_proj.bias.expand_as(x)
    o = head_outputs(x, attn.in_proj_weight, attn.in_proj_bias, attn.num_heads, attn.head_dim,
                     attn_mask)
    return project_heads(o, attn.out_proj.weight, attn.out_proj.bias, head_gate)
