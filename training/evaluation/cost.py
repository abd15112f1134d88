"""What a CLIP model costs: parameters per tower, MACs per image and per text, throughput.

Conventions (TinyCLIP's model-zoo table):
- parameters: image tower (`visual.*`), text tower (everything else except logit_scale/bias),
  and the text tower without its token embedding (the "Text-19M" in ViT-40M/32-Text-19M);
- MACs: half the FLOPs that torch.utils.flop_counter.FlopCounterMode counts for one image /
  one text at full context length. Counted with PyTorch's fused MHA fast path off and the
  math SDPA kernel on: the counter has no formula for the CPU fused kernels and would
  silently drop the attention (matches a hand count exactly, tests/evaluation/test_cost.py);
- throughput: warm-up iterations, then timed iterations of encode_image / encode_text at a
  batch size and precision; pairs/s = 1 / (1/images_per_s + 1/texts_per_s), the rate at which
  both towers together process image-text pairs.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from training.evaluation.features import autocast, unwrap_model
from training.models import input_dtype

TOKEN_EMBEDDING_NAMES = ("token_embedding", "word_embeddings")
NOT_A_TOWER = ("logit_scale", "logit_bias")


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of each tower, with and without the token embedding."""
    counts = {"image_params": 0, "text_params": 0, "token_embedding_params": 0}
    for name, param in unwrap_model(model).named_parameters():
        if name in NOT_A_TOWER:
            continue
        if name.startswith("visual."):
            counts["image_params"] += param.numel()
            continue
        counts["text_params"] += param.numel()
        if any(t in name for t in TOKEN_EMBEDDING_NAMES):
            counts["token_embedding_params"] += param.numel()
    counts["text_params_no_token_embedding"] = (counts["text_params"]
                                                - counts["token_embedding_params"])
    counts["total_params"] = counts["image_params"] + counts["text_params"]
    return counts


def input_shapes(model: torch.nn.Module) -> tuple[tuple[int, int], int]:
    """(image height/width, text context length) the model was built for."""
    model = unwrap_model(model)
    size = getattr(model.visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    context = getattr(model, "context_length", None) or getattr(
        getattr(model, "text", None), "context_length", 77)
    return size, int(context)


def dummy_inputs(model, batch_size: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and all-zero tokens of the model's shapes (cost does not depend on content)."""
    (height, width), context = input_shapes(model)
    images = torch.randn(batch_size, 3, height, width, device=device, dtype=input_dtype(model))
    tokens = torch.zeros(batch_size, context, dtype=torch.long, device=device)
    return images, tokens


@contextlib.contextmanager
def countable_attention():
    """Route attention through ops FlopCounterMode has formulas for (bmm under math SDPA)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_flops(fn, *args) -> int:
    """FLOPs of fn(*args) as the library counts them, with attention countable."""
    counter = FlopCounterMode(display=False)
    with countable_attention(), counter:
        fn(*args)
    return int(counter.get_total_flops())


def macs_per_sample(model: torch.nn.Module) -> dict[str, int]:
    """MACs for one image and for one text (FLOPs / 2), counted on the model's device."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    images, tokens = dummy_inputs(model, 1, device)
    with torch.no_grad():
        return {"image_macs": count_flops(model.encode_image, images) // 2,
                "text_macs": count_flops(model.encode_text, tokens) // 2}


def _samples_per_s(fn, inputs, warmup: int, iters: int, device) -> float:
    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    for _ in range(warmup):
        fn(inputs)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn(inputs)
    sync()
    return len(inputs) * iters / (time.perf_counter() - start)


def throughput(model: torch.nn.Module, batch_size: int = 64, precision: str = "fp32",
               warmup: int = 2, iters: int = 5) -> dict[str, float]:
    """images/s, texts/s and pairs/s (harmonic combination) in eval mode without gradients."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    images, tokens = dummy_inputs(model, batch_size, device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        images_per_s = _samples_per_s(model.encode_image, images, warmup, iters, device)
        texts_per_s = _samples_per_s(model.encode_text, tokens, warmup, iters, device)
    model.train(was_training)
    return {"images_per_s": images_per_s, "texts_per_s": texts_per_s,
            "pairs_per_s": 1.0 / (1.0 / images_per_s + 1.0 / texts_per_s),
            "throughput_batch_size": batch_size, "throughput_precision": precision}


def model_cost(model: torch.nn.Module, batch_size: int | None = 64, precision: str = "fp32",
               warmup: int = 2, iters: int = 5) -> dict:
    """Parameters and MACs, plus throughput unless batch_size is None."""
    cost = {**parameter_counts(model), **macs_per_sample(model)}
    patch = getattr(unwrap_model(model).visual, "patch_size", None)
    if patch is not None:  # ViT towers: part of TinyCLIP's model name (ViT-40M/32)
        cost["patch_size"] = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    if batch_size:
        cost.update(throughput(model, batch_size, precision, warmup, iters))
    return cost
