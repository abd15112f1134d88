"""Importance scores for the units of every axis of a teacher (manual.py's width="importance").

Two measures, both returning {axis units name: tensor of one score per unit}:
- weight_norm_scores: the L2 norm of every weight that reads from or writes to the unit
  (a head: its q, k, v rows and its output-projection columns; an MLP neuron: its c_fc row and
  c_proj column; a channel: its slice of every tensor on that axis). Needs no data.
- activation_scores: mean magnitudes on a few batches of real data, measured with forward
  hooks on the teacher: a head's contribution to the residual stream (its attention output
  through its output-projection columns), an MLP neuron's post-activation times its c_proj
  column norm, a residual channel's mean |x| after every block, a ResNet channel's mean |BN
  output|. Axes without an activation measure (ResNet attention-pool heads, embeddings) keep
  their weight-norm score, so every axis has one.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import nn

from .attention import head_outputs
from .axes import HEADS, QKV, head_dims, model_axes

_NOT_WEIGHTS = ("running_mean", "running_var", "num_batches_tracked")


def weight_norm_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-unit L2 norm of all weights on each axis (BatchNorm running statistics excluded)."""
    dims, axes = head_dims(model), model_axes(model)
    squares: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.endswith(_NOT_WEIGHTS):
            continue
        t = tensor.detach().float() ** 2
        for dim, axis in enumerate(axes[key]):
            if axis is None:
                continue
            per_element = t.sum(dim=[d for d in range(t.ndim) if d != dim]) if t.ndim > 1 else t
            hd = dims.get(axis.units, 1)
            if axis.kind == QKV:
                per_unit = per_element.reshape(3, -1, hd).sum(dim=(0, 2))
            elif axis.kind == HEADS:
                per_unit = per_element.reshape(-1, hd).sum(dim=1)
            else:
                per_unit = per_element
            squares[axis.units] = squares.get(axis.units, 0) + per_unit
    return {units: s.sqrt() for units, s in squares.items()}


class _Accumulator:
    """Running sums of per-unit magnitudes, keyed by axis units name."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, units: str, per_unit: torch.Tensor, count: int) -> None:
        per_unit = per_unit.detach().float().cpu()
        self.sums[units] = self.sums.get(units, 0) + per_unit
        self.counts[units] += count

    def means(self) -> dict[str, torch.Tensor]:
        return {u: s / self.counts[u] for u, s in self.sums.items()}


def _head_norms(attn: nn.MultiheadAttention, x: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """Each head's contribution to the block output, norms per token: (heads, batch * tokens).

    Recomputes the attention (attention.head_outputs: nn.MultiheadAttention does not expose
    per-head outputs); assumes batch_first=True, which open_clip's towers use.
    """
    width, heads, hd = x.shape[-1], attn.num_heads, attn.head_dim
    out = head_outputs(x, attn.in_proj_weight, attn.in_proj_bias, heads, hd, mask)
    w_out = attn.out_proj.weight.reshape(width, heads, hd)           # columns per head
    contrib = torch.einsum("nhld,whd->hnlw", out, w_out)
    return contrib.norm(dim=-1).reshape(heads, -1)


def _hook_transformer(model: nn.Module, acc: _Accumulator) -> list:
    """Hooks on every residual attention block of both towers."""
    handles = []
    for name, block in model.named_modules():
        if type(block).__name__ != "ResidualAttentionBlock":
            continue
        tower = "visual" if name.startswith("visual.") else "text"

        def pre_hook(module, args, kwargs, name=name):
            x = args[0]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            norms = _head_norms(module.attn, module.ln_1(x), mask)
            acc.add(f"{name}.attn.heads", norms.sum(dim=1), norms.shape[1])

        def post_hook(module, args, output, tower=tower):
            flat = output.reshape(-1, output.shape[-1]).abs()
            acc.add(f"{tower}.hidden", flat.sum(dim=0), flat.shape[0])

        def mlp_hook(module, args, output, name=name, block=block):
            flat = output.reshape(-1, output.shape[-1]).abs()
            col_norm = block.mlp.c_proj.weight.norm(dim=0)
            acc.add(f"{name}.mlp", flat.sum(dim=0) * col_norm, flat.shape[0])

        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook))
        handles.append(block.mlp.gelu.register_forward_hook(mlp_hook))
    return handles


def _hook_resnet(model: nn.Module, acc: _Accumulator) -> list:
    """Hooks on every BatchNorm (per-channel mean |output|) of a ModifiedResNet tower."""
    handles = []
    axes = model_axes(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.BatchNorm2d):
            continue
        units = axes[f"{name}.weight"][0].units

        def hook(module, args, output, units=units):
            per_channel = output.abs().mean(dim=(2, 3))
            acc.add(units, per_channel.sum(dim=0), per_channel.shape[0])

        handles.append(module.register_forward_hook(hook))
    return handles


@torch.no_grad()
def activation_scores(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    """Activation statistics of `model` over (images, token ids) batches; see module docstring."""
    acc = _Accumulator()
    handles = _hook_transformer(model, acc) + _hook_resnet(model, acc)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for images, texts in batches:
            model.encode_image(images)
            model.encode_text(texts)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("activation importance needs at least one batch of data")
    scores = weight_norm_scores(model)
    scores.update(acc.means())
    return scores
