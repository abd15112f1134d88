"""Does an exported model compute what the trained one did? Both encode one fixed batch; per
tower: the smallest cosine between matching embeddings and the largest absolute difference.

    batch = probe_batch(spec)                         # images + token ids, seeded
    numbers = compare(reference, candidate, batch)    # {"image": {...}, "text": {...}}
    failures = below(numbers, 0.9999)                 # ["image min cosine 0.9987 < 0.9999"]

Models are anything with open_clip's encode_image / encode_text (a torch model, OnnxClip,
HuggingFaceClip), so every format is checked by the same code.
"""
from __future__ import annotations

import torch

from training.specs import ModelSpec

MIN_COSINE = 0.9999  # the bar an fp32 export must clear (int8 is reported, not held to it)
PROBE_CAPTIONS = ["a photo of a red circle", "two blue squares on a white background",
                  "a small green triangle", "a yellow star", "an empty picture",
                  "a large purple ellipse next to a black line", "stripes", "a dog"]


def probe_batch(spec: ModelSpec, n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """n normalised-looking random images of the spec's size and n tokenized captions."""
    size = spec.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(seed)
    captions = [PROBE_CAPTIONS[i % len(PROBE_CAPTIONS)] for i in range(n)]
    return {"image": torch.randn(n, 3, height, width, generator=generator),
            "text": spec.tokenizer(captions)}


def encode(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"image": model.encode_image(batch["image"], normalize=True).float(),
                "text": model.encode_text(batch["text"], normalize=True).float()}


def compare(reference, candidate, batch: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per tower: min_cosine and max_abs_diff of the candidate's embeddings vs the reference's."""
    ref, out = encode(reference, batch), encode(candidate, batch)
    return {tower: {"min_cosine": float(torch.nn.functional.cosine_similarity(
                        ref[tower], out[tower], dim=-1).min()),
                    "max_abs_diff": float((ref[tower] - out[tower]).abs().max())}
            for tower in ("image", "text")}


def below(numbers: dict[str, dict], min_cosine: float = MIN_COSINE) -> list[str]:
    """The towers whose smallest cosine is under the bar, as readable lines."""
    return [f"{tower} min cosine {n['min_cosine']:.6f} < {min_cosine}"
            for tower, n in numbers.items() if n["min_cosine"] < min_cosine]
