"""Encode an evaluation loader's images (and captions) into features, gathered from all ranks.

Each rank encodes only its share (see datasets.reader_share); the per-rank results are gathered
and put in key order, so every rank ends with the same features as a single-process run and the
metrics computed from them are equal. Features are L2-normalised fp32 on the CPU.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from training.models import input_dtype

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class EvalFeatures:
    """Gathered features of a whole evaluation set, in key order."""

    keys: list[str]
    image_features: torch.Tensor                 # [N, D]
    labels: torch.Tensor                         # [N], -1 where the set has no labels
    text_features: torch.Tensor | None = None    # [T, D], all captions of all images
    text_to_image: torch.Tensor | None = None    # [T], index into image_features
    skipped: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module):
    """Make every parameter whole on each rank for the duration (DeepSpeed ZeRO-3 partitions
    them); a no-op otherwise. Evaluation then calls the towers directly, without per-forward
    collectives, so ranks may run different numbers of batches."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The open_clip model inside a DeepSpeed engine / DDP / FSDP wrapper (`.module` chain)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def autocast(device: torch.device | str, precision: str):
    """Autocast context for `precision` (fp32: none). fp16 on the CPU is refused by name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type == "cpu":
        raise ValueError("precision 'fp16' needs a GPU; use 'bf16' or 'fp32' on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def encode_texts(model, tokenizer: Callable, texts: list[str], device, precision: str = "fp32",
                 batch_size: int = 256) -> torch.Tensor:
    """Normalised fp32 CPU features of `texts`, encoded `batch_size` at a time, in eval mode
    (a zero-shot classifier built during training must not see dropout)."""
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    chunks = []
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start:start + batch_size]).to(device)
            chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
    model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def encode_loader(model, loader: Iterable[dict], device, precision: str = "fp32",
                  tokenizer: Callable | None = None, rank: int = 0, world_size: int = 1
                  ) -> EvalFeatures:
    """Encode this rank's batches; with a tokenizer also every caption; gather; key order.

    `loader` yields datasets.collate_eval batches. With world_size > 1 the process group must be
    initialised (gloo or NCCL); every rank returns the full, identical result.
    """
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    local = {"keys": [], "images": [], "labels": [], "texts": [], "n_captions": [],
             "skipped": Counter()}
    with torch.no_grad():
        for batch in loader:
            local["skipped"].update(batch["skipped"])
            if not batch["key"]:
                continue
            with autocast(device, precision):
                # a bf16/fp16 engine or teacher holds low-precision weights: match their dtype
                images = batch["image"].to(device, dtype=input_dtype(model))
                local["images"].append(model.encode_image(images, normalize=True).float().cpu())
            local["keys"] += batch["key"]
            local["labels"].append(batch["label"])
            if tokenizer is not None:
                captions = [c for caps in batch["captions"] for c in caps]
                local["texts"].append(encode_texts(model, tokenizer, captions, device, precision))
                local["n_captions"] += [len(caps) for caps in batch["captions"]]
    model.train(was_training)
    shares = gather_objects(_pack(local), world_size)
    return _merge(shares, with_texts=tokenizer is not None)


def _pack(local: dict) -> dict:
    """One rank's results as CPU tensors (cheap to pickle for all_gather_object)."""
    def cat(chunks):
        return torch.cat(chunks) if chunks else torch.empty(0)
    return {"keys": local["keys"], "images": cat(local["images"]), "labels": cat(local["labels"]),
            "texts": cat([t for t in local["texts"] if t.numel()]),
            "n_captions": local["n_captions"], "skipped": dict(local["skipped"])}


def gather_objects(obj, world_size: int) -> list:
    """all_gather_object when distributed; [obj] otherwise."""
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, obj)
    return shares


def _merge(shares: list[dict], with_texts: bool) -> EvalFeatures:
    """Concatenate the ranks' shares, then sort samples by key (captions follow their image)."""
    samples = []  # (key, image feature, label, caption features)
    skipped: Counter = Counter()
    for share in shares:
        skipped.update(share["skipped"])
        offsets = [0]
        for n in share["n_captions"]:
            offsets.append(offsets[-1] + n)
        for i, key in enumerate(share["keys"]):
            texts = share["texts"][offsets[i]:offsets[i + 1]] if with_texts else None
            samples.append((key, share["images"][i], int(share["labels"][i]), texts))
    if not samples:
        raise ValueError("the evaluation set gave no usable sample"
                         + (f" (skipped: {dict(skipped)})" if skipped else ""))
    samples.sort(key=lambda s: s[0])
    result = EvalFeatures(
        keys=[s[0] for s in samples],
        image_features=torch.stack([s[1] for s in samples]),
        labels=torch.tensor([s[2] for s in samples], dtype=torch.long),
        skipped=dict(skipped),
    )
    if with_texts:
        texts = [s[3] for s in samples if len(s[3])]
        result.text_features = torch.cat(texts) if texts else torch.empty(0, 0)
        result.text_to_image = torch.tensor(
            [i for i, s in enumerate(samples) for _ in range(len(s[3]))], dtype=torch.long)
    return result
