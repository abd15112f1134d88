"""A causal text tower run on the batch's used tokens only: the same features, a fraction of the work.

    out = encode_used_tokens(model, capture, images, texts, batch.get("text_length"))
    # == encode_with_tokens(model, capture, images, texts), the text tower on the used positions

open_clip's CLIP text tower is causal (no token sees a later one) and pools at each caption's
end-of-text token, so the positions after the batch's last end-of-text (padding) change nothing:
not the features, not the gradients (their outputs are never read, and under the causal mask no
earlier position reads them, so their rows of the position embedding get zero gradient either
way). Captions are short (the demo's use 13-15 of 32 positions, CC3M's ~15 of 77), so the text
tower does half or less of its work, forward and backward. Used by the frozen live teacher
(training/teachers.py) and by the student (training/task.py), through this one function.

`used_tokens` makes the model's own forward encode its text on the first `length` positions
(`encode_text_prefix`: positions and causal mask cut to match), so the whole encode stays inside
the model's forward: DeepSpeed ZeRO-3 gathers the CLIP module's own parameters (its
positional_embedding, text_projection, logit_scale) only for that forward and its backward.

The length: the training loader counts each batch's used positions on the CPU while it
tokenizes (`batch["text_length"]`, `batch["teacher_text_length"]`: up to the last non-padding
id; training/data/loader.py), so no step reads the ids back from the device; without it
(`text_length=None`) `causal_text_length` finds the end-of-text positions on the ids' device
(one host synchronisation per call on a GPU).

The whole context runs (no error) when the text tower's token-level outputs are captured
(training/tokens.py: they are compared position by position) and when the tower is not a causal
open_clip CLIP one (timm / Hugging Face / Lite towers, a masked or LiT student).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from training.tokens import TokenCapture, encode_with_tokens


def causal_text_length(model: torch.nn.Module, texts: Optional[torch.Tensor],
                       used: Optional[int] = None) -> Optional[int]:
    """How many leading tokens of `texts` decide an open_clip CLIP's text features, when fewer
    than all; None when that does not hold (another text tower, or no padding to leave out).

    `used`: the batch's used positions as the loader counted them (training/data/loader.py `text_length`), taken
    as is for argmax pooling (the end-of-text id is the largest: it is never padding). Without
    it (or for "eos" pooling, whose end id might be the padding id) the end-of-text positions
    are read from the ids: free on the CPU, one synchronisation on a GPU."""
    if (texts is None or type(model) is not open_clip.CLIP or model.attn_mask is None
            or model.text_pool_type not in ("argmax", "eos")):
        return None
    if used is not None and model.text_pool_type == "argmax":
        length = int(used)
    else:
        if model.text_pool_type == "argmax":
            ends = texts.argmax(dim=-1)
        else:
            ends = (texts == model.text_eos_id).int().argmax(dim=-1)
        length = int(ends.max()) + 1
    return length if length < texts.shape[1] else None


def encode_text_prefix(model: "open_clip.CLIP", texts: torch.Tensor, length: int,
                       normalize: bool = False) -> torch.Tensor:
    """open_clip's CLIP.encode_text on the first `length` tokens (positions and causal mask cut
    to match); equal to the full encode when causal_text_length gave `length`. Call it inside
    the model's forward (`used_tokens`) where its parameters may be partitioned (ZeRO-3)."""
    cast_dtype = model.transformer.get_cast_dtype()
    texts = texts[:, :length]
    x = model.token_embedding(texts).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, texts, model.text_pool_type, eos_token_id=model.text_eos_id)
    if isinstance(model.text_projection, torch.nn.Linear):
        x = model.text_projection(x)
    elif model.text_projection is not None:
        x = x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


@contextmanager
def used_tokens(model: torch.nn.Module, length: Optional[int]) -> Iterator[None]:
    """Inside the block, `model`'s forward encodes its text on the first `length` positions
    (`length` from causal_text_length; None: nothing changes). The model's `encode_text` is
    shadowed by an instance attribute for the block's duration only."""
    if length is None:
        yield
        return
    model.encode_text = lambda text, normalize=False: encode_text_prefix(model, text, length,
                                                                          normalize)
    try:
        yield
    finally:
        del model.encode_text


def encode_used_tokens(model: torch.nn.Module, capture: Optional[TokenCapture],
                       images: Optional[torch.Tensor], texts: Optional[torch.Tensor],
                       text_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """encode_with_tokens (models.encode plus the captured token-level outputs) with a causal
    text tower on the batch's used tokens; the whole context when the capture records text
    tokens. `text_length`: the loader's count for `texts` (None: read from the ids)."""
    length = None
    if capture is None or "text" not in capture.towers:
        length = causal_text_length(model, texts, text_length)
    with used_tokens(model, length):
        return encode_with_tokens(model, capture, images, texts)
