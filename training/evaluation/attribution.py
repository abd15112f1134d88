"""`clip-eval attribution`: what the student attends to, next to what the teacher attends to.

    record = write_attribution(student, teacher, "data/val", "out/attribution",
                               num_images=4, texts=None, top_fraction=0.1)

For the first `num_images` images of an evaluation set, each with its first caption (or with
each of the given `texts`), both models' attribution maps (training/objectives/attribution.py:
the cosine similarity of every final patch token, projected into the joint space, with the
caption's embedding; ViT towers) are computed on each model's own eval crop and tokens. Written
into the output folder:
- `NNN-<key>.png` per (image, text): the image (the student's crop) | the teacher's map | the
  student's map, each map min-max scaled on its own and laid over the image, the text below;
- `attribution.json`: per pair the Pearson correlation of the two maps and the IoU of their top
  `top_fraction` patches, and the means over pairs (`mean_pearson`, `mean_top_k_iou`: 1.0 when
  the student is the teacher). Maps of different patch grids are compared on the smaller grid
  (bilinear), as the attribution term does.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from training.evaluation.datasets import build_eval_loader, open_eval_set
from training.evaluation.loading import LoadedModel
from training.evaluation.suite import eval_transform
from training.files import write_atomic, write_json_atomic
from training.objectives.attribution import attribution_maps, match_grids
from training.tokens import TokenCapture, encode_with_tokens, image_grid

RECORD_FILE = "attribution.json"
PANEL = 224            # pixels per side of each panel of a PNG
CAPTION_STRIP = 28     # pixels below the panels for the text


@dataclass
class Samples:
    keys: list[str]
    captions: list[list[str]]
    images: dict[str, torch.Tensor]   # "student" / "teacher": each model's eval crops [N, 3, H, W]


def read_samples(path: str, models: dict[str, LoadedModel], num_images: int) -> Samples:
    """The first `num_images` samples of the set, cropped by each model's own transform."""
    eval_set = open_eval_set(path)
    batches = {}
    for side, loaded in models.items():
        loader = build_eval_loader(eval_set, eval_transform(loaded.spec.preprocess_cfg),
                                   batch_size=num_images, max_samples=num_images)
        batches[side] = [b for b in loader if b["key"]]
    first = batches["student"]
    if not first:
        raise ValueError(f"{path}: no readable image")
    return Samples(keys=[k for b in first for k in b["key"]],
                   captions=[c for b in first for c in b["captions"]],
                   images={side: torch.cat([b["image"] for b in parts])
                           for side, parts in batches.items()})


@torch.no_grad()
def paired_maps(loaded: LoadedModel, images: torch.Tensor, texts: list[str], device: str
                ) -> torch.Tensor:
    """[N, P] maps of image i with text i under one model."""
    model = loaded.model
    capture = TokenCapture(model, ["image_patch_tokens"], who=f"model {loaded.name}")
    try:
        ids = loaded.spec.tokenizer(texts).to(device)
        outputs = encode_with_tokens(model, capture, images.to(device), ids)
    finally:
        capture.remove()
    return attribution_maps(outputs["image_patch_tokens"], outputs["text_features"],
                            paired=True).float().cpu()


def pearson(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per row Pearson correlation of two [N, P] maps."""
    first, second = (m - m.mean(dim=-1, keepdim=True) for m in (first, second))
    return (first * second).sum(-1) / (first.norm(dim=-1) * second.norm(dim=-1)).clamp_min(1e-12)


def top_k_iou(first: torch.Tensor, second: torch.Tensor, k: int) -> torch.Tensor:
    """Per row IoU of the sets of the k highest patches of two [N, P] maps."""
    ious = []
    for a, b in zip(first, second):
        top_a, top_b = (set(m.topk(k).indices.tolist()) for m in (a, b))
        ious.append(len(top_a & top_b) / len(top_a | top_b))
    return torch.tensor(ious)


def _display(images: torch.Tensor, preprocess_cfg: dict) -> list[Image.Image]:
    """The crops as PIL images (the eval transform's normalisation undone)."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    cfg = merge_preprocess_dict(PreprocessCfg(), dict(preprocess_cfg))
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    pixels = ((images * std + mean).clamp(0, 1) * 255).round().byte()
    return [Image.fromarray(p.permute(1, 2, 0).numpy()).resize((PANEL, PANEL), Image.BICUBIC)
            for p in pixels]


def _overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """A map ([P], square grid) min-max scaled, coloured (inferno) and laid over the image."""
    from matplotlib import colormaps
    side = math.isqrt(heat.numel())
    heat = heat.reshape(side, side)
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    grey = Image.fromarray(heat.numpy().astype(np.float32), mode="F").resize((PANEL, PANEL),
                                                                           Image.BILINEAR)
    colours = colormaps["inferno"](np.clip(np.asarray(grey), 0, 1))[..., :3]
    coloured = Image.fromarray((colours * 255).round().astype(np.uint8))
    return Image.blend(image.convert("RGB"), coloured, 0.55)


def _panel_png(image: Image.Image, teacher: torch.Tensor, student: torch.Tensor, text: str,
               path: Path) -> None:
    sheet = Image.new("RGB", (3 * PANEL, PANEL + CAPTION_STRIP), "white")
    for column, panel in enumerate((image, _overlay(image, teacher), _overlay(image, student))):
        sheet.paste(panel, (column * PANEL, 0))
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(("image", "teacher", "student")):
        draw.text((column * PANEL + 4, 4), label, fill="white")
    draw.text((4, PANEL + 8), text[:110], fill="black")
    write_atomic(path, lambda p: sheet.save(p, format="PNG"))


def _file_name(index: int, key: str) -> str:
    """NNN-<key>.png with the key reduced to safe characters (never leaves the folder)."""
    return f"{index:03d}-{re.sub(r'[^A-Za-z0-9_-]+', '_', key)[:60]}.png"


def write_attribution(student: LoadedModel, teacher: LoadedModel, images: str, out: str,
                      num_images: int = 4, texts: list[str] | None = None,
                      top_fraction: float = 0.1, device: str = "cpu") -> dict:
    """Heatmaps and the agreement record (module doc); returns the record."""
    models = {"student": student, "teacher": teacher}
    for side, loaded in models.items():
        image_grid(loaded.model)  # a ViT image tower, else one line before any image is read
    samples = read_samples(images, models, num_images)
    pairs = [(i, text) for i in range(len(samples.keys))
             for text in (texts or samples.captions[i][:1])]
    if not pairs:
        raise ValueError(f"{images}: the images have no captions; give --texts")
    rows = torch.tensor([i for i, _ in pairs])
    maps = {side: paired_maps(loaded, samples.images[side][rows], [t for _, t in pairs], device)
            for side, loaded in models.items()}
    teacher_maps, student_maps = match_grids(maps["teacher"], maps["student"])
    k = max(1, round(top_fraction * teacher_maps.shape[-1]))
    correlations, ious = pearson(teacher_maps, student_maps), top_k_iou(teacher_maps,
                                                                         student_maps, k)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    crops = _display(samples.images["student"][rows], student.spec.preprocess_cfg)
    records = []
    for n, (i, text) in enumerate(pairs):
        name = _file_name(n, samples.keys[i])
        _panel_png(crops[n], maps["teacher"][n], maps["student"][n], text, out_dir / name)
        records.append({"key": samples.keys[i], "text": text, "png": name,
                        "pearson": float(correlations[n]), "top_k_iou": float(ious[n])})
    record = {"images": str(images), "num_pairs": len(pairs), "top_k": k,
              "student": {"model": student.name, "checkpoint": student.source,
                          "grid": list(image_grid(student.model))},
              "teacher": {"model": teacher.name, "checkpoint": teacher.source,
                          "grid": list(image_grid(teacher.model))},
              "compared_patches": int(teacher_maps.shape[-1]),
              "mean_pearson": float(correlations.mean()), "mean_top_k_iou": float(ious.mean()),
              "pairs": records}
    write_json_atomic(out_dir / RECORD_FILE, record, indent=2)
    return record
