"""Gradient accumulation that stays exact with a batch-level loss (contrastive, affinity).

A contrastive or affinity loss couples every sample of the batch with every other, so summing
per-micro-batch losses is NOT the full-batch loss (OpenCLIP therefore refuses accumulation with
distillation). OpenCLIP's feature caching fixes that: first a no-grad pass over all micro-batches
caches the student's outputs; then, for each micro-batch j, a grad pass recomputes j's outputs
and evaluates the FULL-batch loss on [cached 0..j-1, live j, cached j+1..]. The gradient of that
pass is exactly dL/d(outputs_j) * d(outputs_j)/d(theta), and the sum over j is the full-batch
gradient (needs a deterministic forward: no dropout, which CLIP towers do not use).

Outputs shared by the whole batch (the logit scale, and any other entry without a batch axis)
get their gradient from every pass; they are kept live in pass 0 only, so it is counted once.
"""
from __future__ import annotations

import torch


def is_per_sample(value) -> bool:
    """Per-sample outputs are [batch, ...] matrices; scalars and [1]-shaped scales are shared."""
    return isinstance(value, torch.Tensor) and value.ndim >= 2


def concat_outputs(outputs: list[dict]) -> dict:
    """Join micro-batch outputs into one batch (shared entries taken from the first)."""
    first = outputs[0]
    return {key: torch.cat([out[key] for out in outputs]) if is_per_sample(first[key])
            else first[key] for key in first}


def with_live_micro_batch(cached: list[dict], live: dict, index: int) -> dict:
    """The full batch's outputs with micro-batch `index` carrying gradient, the rest detached.

    Shared entries come from part 0, so they are live in pass 0 only.
    """
    parts = [live if i == index else {k: _detach(v) for k, v in out.items()}
             for i, out in enumerate(cached)]
    return concat_outputs(parts)


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value
