"""Teacher and student views of one augmented image.

TinyCLIP's train transform is one RandomResizedCrop (scale 0.9-1.0, bicubic) then normalisation.
Distillation needs teacher and student to see the SAME crop, so the crop is drawn once, at the
larger of the two input sizes, and each model's view is derived from it: resized (only if its size
is smaller) and normalised with its own mean/std. When both preprocessings are equal (`shared`)
the teacher view is not computed: the loader gives the teacher the very same tensor (no second
decode, no copy).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import PIL.Image
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from .sources import DataError

CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ViewSpec:
    """The parts of an open_clip preprocess config that a training view depends on."""
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @classmethod
    def from_preprocess(cls, preprocess: dict, name: str = "preprocess") -> "ViewSpec":
        """From open_clip's preprocess dict (`size` or `image_size`, mean, std, interpolation)."""
        size = preprocess.get("size", preprocess.get("image_size"))
        if size is None or "mean" not in preprocess or "std" not in preprocess:
            raise DataError(f"{name}: needs size (or image_size), mean and std, got keys {sorted(preprocess)}")
        if isinstance(size, int):
            size = (size, size)
        return cls(tuple(int(s) for s in size)[-2:], tuple(map(float, preprocess["mean"])),
                   tuple(map(float, preprocess["std"])), preprocess.get("interpolation") or "bicubic")

    @property
    def interpolation_mode(self) -> InterpolationMode:
        return InterpolationMode.BILINEAR if self.interpolation == "bilinear" else InterpolationMode.BICUBIC


def crop_box(width: int, height: int, rng: random.Random,
             scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop, as torchvision draws it.

    Re-written from torchvision's RandomResizedCrop.get_params because that one draws from torch's
    global RNG; here each sample has its own seeded RNG, so a resumed run redraws the same crops
    and the trainer's RNG stays untouched.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback to a central crop with the ratio clamped, as torchvision does.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PairedViews:
    """Per sample, `crop(image, rng)`: one random crop as uint8 [3,H,W] at the larger input size.
    Per batch, `batch_views(crops)`: (student view, teacher view) as normalised floats; the teacher
    view is None without a teacher and when `shared` (it would equal the student view).

    Scaling, resizing and normalising run once per batch on the stacked crops rather than per
    sample: the same arithmetic, far fewer small tensor operations.
    """

    def __init__(self, student: ViewSpec, teacher: ViewSpec | None = None):
        self.student = student
        self.teacher = teacher
        self.shared = teacher is not None and teacher == student
        sizes = [student.size] + ([teacher.size] if teacher is not None else [])
        self.crop_size = max(sizes, key=lambda s: s[0] * s[1])
        # The crop is resampled with the interpolation of the model that sees it at full size.
        full = teacher if teacher is not None and teacher.size == self.crop_size else student
        self.crop_interpolation = full.interpolation_mode

    def crop(self, image: PIL.Image.Image, rng: random.Random) -> torch.Tensor:
        return self.crop_at(image, crop_box(image.width, image.height, rng))

    def crop_at(self, image: PIL.Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        """The crop `box` (top, left, height, width) of `image`: a drawn one, or one stored with
        teacher embeddings (clip-data embed), re-applied."""
        top, left, h, w = box
        if not (0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= image.height
                and left + w <= image.width):
            raise DataError(f"crop box {box} lies outside the {image.width}x{image.height} image")
        crop = TF.resized_crop(image, top, left, h, w, list(self.crop_size),
                               interpolation=self.crop_interpolation, antialias=True)
        return TF.pil_to_tensor(crop)

    def batch_views(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = crops.float().div_(255)
        student = self._view(pixels, self.student)
        if self.teacher is None or self.shared:
            return student, None
        return student, self._view(pixels, self.teacher)

    def _view(self, pixels: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
        if spec.size != self.crop_size:
            pixels = TF.resize(pixels, list(spec.size), interpolation=spec.interpolation_mode, antialias=True)
        return TF.normalize(pixels, spec.mean, spec.std)
