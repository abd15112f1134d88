"""Attribution alignment: which image regions explain a caption should agree between student and
teacher (Cognitive Distillation's semantic alignment loss).

    loss:
      terms:
        attribution:
          weight: 1.0
          captions: paired        # [B, P] maps: each image with its own caption; or "all":
                                  # [B, B_global, P] maps against every caption of the batch
          kind: kl                # KL over patches of softmax(map / temperature); or mse
          temperature: 0.1

A map is the cosine similarity of each final patch token projected into the joint space
(`image_patch_tokens`, training/tokens.py, normalised here) with a caption's text embedding:
`attribution_maps`. With `captions: all` the captions are the batch's over every rank (gathered
with gradient, like the contrastive terms), so each rank's loss is the mean over its images x all
captions and the ranks' mean is the full-batch loss. `kl`: KL(teacher || student) of the
distributions over patches at `temperature`, summed over patches and averaged over maps; `mse`:
the mean squared difference of the raw similarity maps. When the patch grids differ (another
patch size or image size), the maps of the larger grid are resized bilinearly to the smaller grid
(`match_grids`; square grids) before they are compared. Only the student's maps carry gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.objectives.base import LossTerm, TermInputs, register_term

KINDS = ("kl", "mse")
CAPTIONS = ("paired", "all")


def attribution_maps(patch_tokens: torch.Tensor, text_features: torch.Tensor,
                     paired: bool) -> torch.Tensor:
    """Cosine similarity of each patch with each caption: patch_tokens [B, P, D], text_features
    [N, D] -> [B, N, P]; paired (N == B): image b with caption b only -> [B, P]."""
    patches = F.normalize(patch_tokens.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    if paired:
        return torch.einsum("bpd,bd->bp", patches, texts)
    return torch.einsum("bpd,nd->bnp", patches, texts)


def square_grid(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"attribution maps of {num_patches} patches: resizing needs square grids")
    return side


def resize_maps(maps: torch.Tensor, side: int) -> torch.Tensor:
    """[..., P] maps on a square grid resized bilinearly to side x side patches."""
    grid = square_grid(maps.shape[-1])
    flat = maps.reshape(-1, 1, grid, grid)
    resized = F.interpolate(flat, size=(side, side), mode="bilinear", align_corners=False)
    return resized.reshape(*maps.shape[:-1], side * side)


def match_grids(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps on the smaller of their two (square) patch grids."""
    if first.shape[-1] == second.shape[-1]:
        return first, second
    side = min(square_grid(first.shape[-1]), square_grid(second.shape[-1]))
    return resize_maps(first, side), resize_maps(second, side)


@register_term
class AttributionTerm(LossTerm):
    """Align the student's patch-to-caption similarity maps with the teacher's (module doc)."""

    name = "attribution"
    student_keys = ("image_patch_tokens",)
    teacher_keys = ("image_patch_tokens",)

    def __init__(self, kind: str = "kl", temperature: float = 0.1, captions: str = "paired"):
        super().__init__()
        for option, value, allowed in (("kind", kind, KINDS), ("captions", captions, CAPTIONS)):
            if value not in allowed:
                raise ValueError(f"loss.terms.attribution.{option}: {value!r} is not one of "
                                 f"{', '.join(allowed)}")
        if not temperature > 0:
            raise ValueError(f"loss.terms.attribution.temperature: {temperature!r} must be > 0")
        self.kind, self.temperature, self.paired = kind, float(temperature), captions == "paired"

    def maps(self, inputs: TermInputs, side: str) -> torch.Tensor:
        """`side`'s maps for this rank's images: against their own captions, or all ranks'."""
        outputs = getattr(inputs, side)
        patches = outputs["image_patch_tokens"]
        if not self.paired:
            return attribution_maps(patches, inputs.gathered(side, "text_features"), False)
        texts = outputs["text_features"]  # K captions per image: K rows per image, image-major
        return attribution_maps(patches.repeat_interleave(texts.shape[0] // patches.shape[0], 0),
                                texts, True)

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        if inputs.teacher is None or "ensemble" in inputs.teacher:
            raise ValueError("loss.terms.attribution: needs one live teacher")
        with torch.no_grad():
            teacher_maps = self.maps(inputs, "teacher")
        student_maps, teacher_maps = match_grids(self.maps(inputs, "student"), teacher_maps)
        if self.kind == "mse":
            return F.mse_loss(student_maps, teacher_maps)
        target = F.log_softmax(teacher_maps / self.temperature, dim=-1)
        log_probs = F.log_softmax(student_maps / self.temperature, dim=-1)
        kl = (target.exp() * (target - log_probs)).sum(dim=-1)
        return kl.mean()
