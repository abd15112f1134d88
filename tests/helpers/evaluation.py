"""Small evaluation sets and models for tests/evaluation (real shards, real open_clip models).

`make_labelled_shards` writes the clip_benchmark layout (KEY.png + KEY.cls, classnames.txt,
zeroshot_classification_templates.txt); `make_caption_shards` writes Karpathy-style test shards
(KEY.png, KEY.txt = first caption, KEY.json {"captions": [...]}) with `captions_per_image`
captions; `make_imagefolder` writes the same labelled images as DIR/<class>/<key>.png.
Images are solid colours with noise, so they are small and decode everywhere.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import webdataset as wds
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "purple": (140, 40, 170), "white": (240, 240, 240),
           "black": (10, 10, 10)}
TEMPLATES = ["a photo of a {c} square.", "a {c} image.", "something {c}."]


def tiny_model(name: str = "Tiny-ViT-Student", seed: int = 0):
    """A randomly initialised tiny open_clip model (configs/models), eval mode."""
    import torch
    open_clip.add_model_config(str(REPO_ROOT / "configs" / "models"))
    torch.manual_seed(seed)
    return open_clip.create_model(name).eval()


def _png(colour, rng, size=64) -> bytes:
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_labelled_shards(out_dir, n: int = 28, per_shard: int = 10, seed: int = 0) -> Path:
    """n images cycling through the colours, labels = colour index, shards of per_shard."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng, names = np.random.default_rng(seed), list(COLOURS)
    with wds.ShardWriter(str(out / "zs-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            label = i % len(names)
            sink.write({"__key__": f"s{i:05d}", "png": _png(COLOURS[names[label]], rng),
                        "cls": str(label)})
    (out / "classnames.txt").write_text("\n".join(names) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return out


def make_caption_shards(out_dir, n: int = 24, per_shard: int = 8, captions_per_image: int = 5,
                        seed: int = 0) -> Path:
    """n captioned images; caption j of image i names its colour in a varied sentence."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng, names = np.random.default_rng(seed), list(COLOURS)
    with wds.ShardWriter(str(out / "val-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            colour = names[i % len(names)]
            captions = [f"picture {i} number {j}: a {colour} square" for j in
                        range(captions_per_image)]
            sink.write({"__key__": f"v{i:05d}", "png": _png(COLOURS[colour], rng),
                        "txt": captions[0], "json": json.dumps({"captions": captions})})
    return out


def make_imagefolder(out_dir, n: int = 21, seed: int = 0) -> Path:
    """The labelled images as an ImageFolder tree (class folders named after the colours)."""
    out = Path(out_dir)
    rng, names = np.random.default_rng(seed), list(COLOURS)
    for i in range(n):
        folder = out / names[i % len(names)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"s{i:05d}.png").write_bytes(_png(COLOURS[names[i % len(names)]], rng))
    return out
