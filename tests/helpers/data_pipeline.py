"""Shared test code for the training data pipeline (tests/training/test_data*.py)."""
from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import open_clip
import webdataset as wds
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from training.data import DataConfig, build_train_loader

# What open_clip.get_model_preprocess_cfg gives for configs/models/Tiny-ViT-*.json (64 px).
TINY_PREPROCESS = {"size": (64, 64), "mode": "RGB", "mean": OPENAI_DATASET_MEAN,
                   "std": OPENAI_DATASET_STD, "interpolation": "bicubic", "resize_mode": "shortest",
                   "fill_color": 0}


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    open_clip.add_model_config(str(Path(__file__).resolve().parents[2] / "configs" / "models"))
    return open_clip.get_tokenizer("Tiny-ViT-Student")


def train_loader(cfg: DataConfig, **overrides):
    """cfg.validate(), then build_train_loader for the tiny models: rank 0 of 1, epoch 0, seed 0,
    no teacher unless overridden."""
    cfg.validate()
    kwargs = dict(seed=0, student_preprocess=TINY_PREPROCESS, teacher_preprocess=None,
                  tokenizer=tiny_tokenizer(), rank=0, world_size=1, epoch=0)
    return build_train_loader(cfg, **{**kwargs, **overrides})


def epoch_keys(loader) -> list[list[str]]:
    """The keys of every batch, in order."""
    return [batch["key"] for batch in loader]


def jpeg_bytes(seed: int, size: int = 48) -> bytes:
    image = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A shard from explicit samples ({"__key__", ext: bytes|str}) via webdataset's TarWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def write_img2dataset_shard(folder: Path, shard: int, count: int, stats: bool = True) -> Path:
    """A shard laid out as img2dataset writes it: NNNNN.tar with KEY.jpg/.txt/.json (no `captions`
    list), plus NNNNN_stats.json; no sizes.json."""
    samples = []
    for index in range(count):
        key = f"{shard:05d}{index:04d}"
        meta = {"url": f"http://127.0.0.1/{key}.jpg", "caption": f"photo {key}", "key": key,
                "status": "success", "width": 48, "height": 48}
        samples.append({"__key__": key, "jpg": jpeg_bytes(index), "txt": f"photo {key}",
                        "json": json.dumps(meta).encode()})
    path = write_tar(folder / f"{shard:05d}.tar", samples)
    if stats:
        (folder / f"{shard:05d}_stats.json").write_text(
            json.dumps({"count": count, "successes": count, "failed_to_download": 0}))
    return path
