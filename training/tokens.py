"""Token-level outputs of an open_clip model, captured with forward hooks during its forward.

    capture = TokenCapture(model, ["image_blocks.1", "image_patch_tokens"], who="student")
    out = encode_with_tokens(model, capture, images, texts)
    # models.encode's dict + {"image_blocks.1": [B, 1+P, width], "image_patch_tokens": [B, P, D]}

Keys (per-sample [batch, ...] tensors, so feature caching concatenates them like the embeddings):
- `image_blocks.<i>`: the output of visual.transformer.resblocks[i], [B, 1 + P, width] (the class
  token first, then the P patch tokens in row-major grid order).
- `text_blocks.<i>`: the output of the text transformer's resblocks[i], [B, context, width].
- `image_patch_tokens`: the final patch tokens before pooling, after ln_post, projected into the
  joint space by visual.proj: [B, P, embed_dim] (not normalised).
- `text_token_features`: every position's final token after ln_final, projected by
  text_projection: [B, context, embed_dim] (not normalised; positions after the end token too).

ZeRO-3 safe: every value is computed inside the model's own forward (a hook on a submodule runs
while its parent's parameters are gathered: visual.proj inside the visual tower's forward,
text_projection inside the model's), never by reading parameters outside it. The hooks record
only inside `recording()`, so a recomputation under activation checkpointing adds nothing.
Supported towers: open_clip's VisionTransformer (class token; pooled by the class token or the
mean) and its text transformer (CLIP, or CustomTextCLIP's `text`); others are refused in one
line when the capture is built.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from training import models

BLOCK_KEY = re.compile(r"^(image|text)_blocks\.(\d+)$")
FINAL_KEYS = ("image_patch_tokens", "text_token_features")


def is_token_key(key: str) -> bool:
    """Whether `key` names a captured token-level output (as opposed to a head's entry)."""
    return key in FINAL_KEYS or BLOCK_KEY.match(key) is not None


def block_key(tower: str, index: int) -> str:
    return f"{tower}_blocks.{index}"


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding transformer / ln_final / text_projection (CLIP itself, or `text`)."""
    return getattr(model, "text", model)


def tower_transformer(model: nn.Module, tower: str, who: str) -> nn.Module:
    """The tower's open_clip Transformer (with `resblocks`), or a one-line ValueError."""
    owner = model.visual if tower == "image" else _text_tower(model)
    transformer = getattr(owner, "transformer", None)
    if not isinstance(getattr(transformer, "resblocks", None), nn.ModuleList):
        raise ValueError(f"{who}: token-level outputs of the {tower} tower need an open_clip "
                         f"transformer tower, not {type(owner).__name__} (intermediate features "
                         f"of ResNet, timm or Hugging Face towers are not supported)")
    return transformer


def tower_width(model: nn.Module, tower: str, who: str = "model") -> int:
    return int(tower_transformer(model, tower, who).width)


def tower_layout(model: nn.Module, tower: str, who: str = "model") -> dict:
    """{"blocks": number of blocks, "width": token width, "tokens": tokens per sample}: what a
    pairing of student and teacher blocks is checked against before training."""
    transformer = tower_transformer(model, tower, who)
    if tower == "image":
        grid = model.visual.grid_size
        tokens = grid[0] * grid[1] + 1
    else:
        tokens = int(_text_tower(model).context_length)
    return {"blocks": len(transformer.resblocks), "width": int(transformer.width), "tokens": tokens}


def image_grid(model: nn.Module) -> tuple[int, int]:
    """The patch grid (rows, columns) of a ViT image tower."""
    tower_transformer(model, "image", "model")
    return tuple(int(n) for n in model.visual.grid_size)


class TokenCapture:
    """Forward hooks on `model` that record the token-level outputs `keys` (module doc)."""

    def __init__(self, model: nn.Module, keys: Iterable[str], who: str = "model"):
        self.keys = tuple(sorted(set(keys)))
        self._record: dict | None = None
        self._handles = []
        for key in self.keys:
            module, transform = self._site(model, key, who)
            self._handles.append(module.register_forward_hook(partial(self._hook, key, transform)))

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """A dict that the forwards run inside the block fill with the captured keys."""
        self._record = {}
        try:
            yield self._record
        finally:
            self._record = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, key: str, transform: Callable, _module, _args, output) -> None:
        if self._record is not None:
            self._record[key] = transform(output)

    @staticmethod
    def _site(model: nn.Module, key: str, who: str) -> tuple[nn.Module, Callable]:
        """The module whose output holds `key`, and the map from that output to the value."""
        match = BLOCK_KEY.match(key)
        if match:
            tower, index = match.group(1), int(match.group(2))
            transformer = tower_transformer(model, tower, who)
            blocks = transformer.resblocks
            if index >= len(blocks):
                raise ValueError(f"{who}: {key}: the {tower} tower has {len(blocks)} blocks "
                                 f"(0..{len(blocks) - 1})")
            batch_first = getattr(transformer, "batch_first", True)
            return blocks[index], (lambda x: x) if batch_first else (lambda x: x.transpose(0, 1))
        if key == "image_patch_tokens":
            visual = model.visual
            tower_transformer(model, "image", who)
            if (getattr(visual, "attn_pool", None) is not None or visual.final_ln_after_pool
                    or visual.pool_type not in ("tok", "avg") or visual.proj is None):
                raise ValueError(f"{who}: image_patch_tokens need a ViT pooled by its class token "
                                 f"or the mean, with ln_post on the tokens and a projection")
            return visual.ln_post, lambda x: x[:, 1:] @ visual.proj
        if key == "text_token_features":
            text = _text_tower(model)
            tower_transformer(model, "text", who)
            if text.text_projection is None:
                raise ValueError(f"{who}: text_token_features need a text projection")
            if isinstance(text.text_projection, nn.Linear):
                return text.ln_final, lambda x: text.text_projection(x)
            return text.ln_final, lambda x: x @ text.text_projection
        raise ValueError(f"{who}: {key!r} is not a token-level output (image_blocks.<i>, "
                         f"text_blocks.<i>, {', '.join(FINAL_KEYS)})")


def encode_with_tokens(model: nn.Module, capture: TokenCapture | None, images: torch.Tensor | None,
                       texts: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """models.encode's outputs plus the token-level outputs `capture` records (None: none)."""
    if capture is None:
        return models.encode(model, images, texts)
    with capture.recording() as tokens:
        outputs = models.encode(model, images, texts)
    return {**outputs, **tokens}
