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

ZeRO-3 safe: everything is computed inside the engine-wrapped module's forward. The hooks record
the blocks' (and ln_post's / ln_final's) outputs as the engine hands them on; the projection of
the final tokens is the forward of the TokenCapture module itself, a module of the task, so
DeepSpeed registers visual.proj / text_projection as its external parameters and gathers them
for its forward and its backward; each value is tied with weight 0 to its tower's embedding
(`TokenCapture.forward`), so the towers' own parameters are gathered for the backward of a loss
that reads token outputs only (tested against ZeRO-0 in a real engine). The hooks record only
inside `recording()`, so a recomputation under activation checkpointing adds nothing.
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


class TokenCapture(nn.Module):
    """Forward hooks on `model` that record the token-level outputs `keys` (module doc).

    A module without parameters or state (nothing in the state dict): the hooks record the
    blocks' and norms' outputs, and its own forward projects the final tokens into the joint
    space. Being a module of the task lets DeepSpeed ZeRO-3 see the projection matrices it
    reads as its external parameters (gathered for its forward and again for its backward).
    """

    def __init__(self, model: nn.Module, keys: Iterable[str], who: str = "model"):
        super().__init__()
        self.keys = tuple(sorted(set(keys)))
        self._record: dict | None = None
        self._handles = []
        # (module, key) per key, and the projection of the final tokens per final key; plain
        # lists and closures, so the model's modules are not registered here a second time.
        self._sites = [(self._site(model, key, who), key) for key in self.keys]
        self._projections = {key: self._projection(model, key) for key in self.keys
                             if key in FINAL_KEYS}

    @property
    def towers(self) -> set[str]:
        """The towers ("image", "text") whose token-level outputs are captured."""
        return {key.split("_", 1)[0] for key in self.keys}

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """A dict that the forwards run inside the block fill with the recorded outputs
        (final tokens before their projection: pass the dict through this module)."""
        if not self._handles:
            # Registered at the first forward, so under DeepSpeed after the engine's own hooks:
            # what is recorded is the output as the engine hands it on (with its backward hooks).
            self._handles = [module.register_forward_hook(partial(self._hook, key))
                             for module, key in self._sites]
        self._record = {}
        try:
            yield self._record
        finally:
            self._record = None

    def forward(self, recorded: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """The recorded outputs with the final tokens projected into the joint space, each tied
        with weight 0 to its tower's embedding in `outputs` (the model's returned dict).

        The tie keeps the tower's output in the backward graph of a loss that reads only token
        outputs: ZeRO-3 gathers a tower's own parameters (the ViT's class and position
        embeddings, the text position embedding) again when the gradient reaches the tower's
        output, and would otherwise meet their gradients partitioned."""
        anchors = {"image": outputs.get("image_features"), "text": outputs.get("text_features")}
        values = {}
        for key, value in recorded.items():
            if key in self._projections:
                value = self._projections[key](value)
            anchor = anchors[key.split("_", 1)[0]]
            if anchor is not None and anchor.requires_grad:
                value = value + 0.0 * anchor.sum().to(value.dtype)
            values[key] = value
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, key: str, _module, _args, output) -> None:
        if self._record is not None:
            self._record[key] = output

    @staticmethod
    def _site(model: nn.Module, key: str, who: str) -> nn.Module:
        """The module whose output holds `key` (a one-line ValueError when there is none)."""
        match = BLOCK_KEY.match(key)
        if match:
            tower, index = match.group(1), int(match.group(2))
            transformer = tower_transformer(model, tower, who)
            if not getattr(transformer, "batch_first", True):
                raise ValueError(f"{who}: {key}: the {tower} transformer is not batch-first")
            blocks = transformer.resblocks
            if index >= len(blocks):
                raise ValueError(f"{who}: {key}: the {tower} tower has {len(blocks)} blocks "
                                 f"(0..{len(blocks) - 1})")
            return blocks[index]
        if key == "image_patch_tokens":
            visual = model.visual
            tower_transformer(model, "image", who)
            if (getattr(visual, "attn_pool", None) is not None or visual.final_ln_after_pool
                    or visual.pool_type not in ("tok", "avg") or visual.proj is None):
                raise ValueError(f"{who}: image_patch_tokens need a ViT pooled by its class token "
                                 f"or the mean, with ln_post on the tokens and a projection")
            return visual.ln_post
        if key == "text_token_features":
            text = _text_tower(model)
            tower_transformer(model, "text", who)
            if text.text_projection is None:
                raise ValueError(f"{who}: text_token_features need a text projection")
            return text.ln_final
        raise ValueError(f"{who}: {key!r} is not a token-level output (image_blocks.<i>, "
                         f"text_blocks.<i>, {', '.join(FINAL_KEYS)})")

    @staticmethod
    def _projection(model: nn.Module, key: str) -> Callable:
        """The map from the recorded norm output to the key's value. The matrix is looked up at
        each call (the module's current parameter, gathered by ZeRO-3 when read)."""
        if key == "image_patch_tokens":
            visual = model.visual
            return lambda x: x[:, 1:] @ visual.proj
        text = _text_tower(model)
        if isinstance(text.text_projection, nn.Linear):
            return lambda x: text.text_projection(x)
        return lambda x: x @ text.text_projection


def encode_with_tokens(model: nn.Module, capture: TokenCapture | None, images: torch.Tensor | None,
                       texts: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """models.encode's outputs plus the token-level outputs `capture` records (None: none)."""
    if capture is None:
        return models.encode(model, images, texts)
    with capture.recording() as recorded:
        outputs = models.encode(model, images, texts)
    return {**outputs, **capture(recorded, outputs)}
