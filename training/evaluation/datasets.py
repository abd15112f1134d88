"""Evaluation sets: a folder of WebDataset shards (labelled or captioned) or an ImageFolder tree.

Why a reader of its own rather than the training loader: evaluation must see every sample
exactly once, with its key, label and *all* its captions, and each rank (and each loader worker)
must read a disjoint share so that gathered results equal a single-process run. Training streams
(resampled, shuffled, paired views) want the opposite. Reading is webdataset's (tar parsing,
grouping by key); the split and the decoding are here.

Layouts read (docs/architecture.md, shard contract):
- shards: `DIR/*.tar`, samples `KEY.jpg|png|webp`, `KEY.cls` (labelled), `KEY.json` with
  `captions` (retrieval; else `KEY.txt`), `DIR/classnames.txt`,
  `DIR/zeroshot_classification_templates.txt`. img2dataset output reads the same way.
- ImageFolder: `DIR/<class name>/<image>`; class order = sorted folder names (torchvision's).
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


class EvalDataError(ValueError):
    """An evaluation set that cannot be read (message names the path and what is wrong)."""


@dataclass
class EvalSet:
    """Where an evaluation set lives and what it carries; built by `open_eval_set`."""

    path: Path
    kind: str                                   # "shards" or "imagefolder"
    shards: list[str] = field(default_factory=list)
    classnames: list[str] | None = None         # from classnames.txt or the folder names
    templates: list[str] | None = None          # from zeroshot_classification_templates.txt


def open_eval_set(path: str | os.PathLike) -> EvalSet:
    """Describe the evaluation set at `path` (shard folder or ImageFolder tree), checking it first."""
    path = Path(path)
    if not path.is_dir():
        raise EvalDataError(f"{path}: evaluation set not found (expected a folder of .tar shards "
                            f"or an ImageFolder tree)")
    shards = sorted(str(p) for p in path.glob("*.tar"))
    classnames = _read_lines(path / CLASSNAMES_FILE)
    templates = _read_lines(path / TEMPLATES_FILE)
    if templates is not None:
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise EvalDataError(f"{path / TEMPLATES_FILE}: template without '{{c}}': {bad[0]!r}")
    if shards:
        return EvalSet(path, "shards", shards, classnames, templates)
    class_dirs = sorted(p.name for p in path.iterdir() if p.is_dir())
    if class_dirs:
        return EvalSet(path, "imagefolder", [], classnames or class_dirs, templates)
    raise EvalDataError(f"{path}: no .tar shards and no class folders")


def _read_lines(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reader_share(n_shards: int, rank: int, world_size: int) -> tuple[int, int, int, int]:
    """Which part this (rank, worker) reads: (shard_start, shard_step, sample_start, sample_step).

    With at least one shard per reader the shards are dealt out (no tar is opened twice);
    with fewer shards than readers every reader walks all shards and keeps every n-th sample.
    Either way each sample goes to exactly one reader.
    """
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    reader, readers = rank * workers + worker, world_size * workers
    if n_shards >= readers:
        return reader, readers, 0, 1
    return 0, 1, reader, readers


class ShardEvalDataset(IterableDataset):
    """This rank's share of a shard set as dicts {key, image, label, captions}.

    A sample that cannot be used is yielded as {"skip": reason} so that the count survives
    loader worker processes; `collate_eval` drops it and counts it per reason.
    """

    def __init__(self, shards: list[str], transform: Callable, rank: int = 0, world_size: int = 1):
        self.shards, self.transform = shards, transform
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        shard_start, shard_step, sample_start, sample_step = reader_share(
            len(self.shards), self.rank, self.world_size)
        urls = self.shards[shard_start::shard_step]
        samples = wds.tarfile_samples([{"url": u} for u in urls])
        for index, raw in enumerate(samples):
            if index % sample_step != sample_start:
                continue
            yield self._decode(raw)

    def _decode(self, raw: dict) -> dict:
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if image_ext is None:
            return {"skip": "no image"}
        try:
            image = Image.open(io.BytesIO(raw[image_ext])).convert("RGB")
        except Exception:  # PIL raises many types for corrupt bytes; a skip is counted
            return {"skip": "undecodable image"}
        label = int(raw["cls"].decode().strip()) if "cls" in raw else -1
        return {"key": raw["__key__"], "image": self.transform(image), "label": label,
                "captions": _captions(raw)}


def _captions(raw: dict) -> list[str]:
    """All captions of a sample: json `captions` if present, else the single `.txt` caption."""
    if "json" in raw:
        meta = json.loads(raw["json"])
        if isinstance(meta.get("captions"), list) and meta["captions"]:
            return [str(c) for c in meta["captions"]]
    if "txt" in raw:
        return [raw["txt"].decode("utf-8").strip()]
    return []


class ImageFolderEvalDataset(Dataset):
    """This rank's share (every world_size-th file) of an ImageFolder tree, same dict items."""

    def __init__(self, root: Path, transform: Callable, rank: int = 0, world_size: int = 1):
        from torchvision.datasets import ImageFolder  # torchvision's class order and extensions

        self.folder = ImageFolder(str(root))
        self.indices = list(range(rank, len(self.folder.samples), world_size))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        path, label = self.folder.samples[self.indices[i]]
        image = self.folder.loader(path).convert("RGB")
        key = os.path.relpath(path, self.folder.root)
        return {"key": key, "image": self.transform(image), "label": label, "captions": []}


def collate_eval(items: list[dict]) -> dict:
    """Stack images and labels; keep keys and caption lists as Python lists; count skips."""
    skipped = Counter(it["skip"] for it in items if "skip" in it)
    items = [it for it in items if "skip" not in it]
    if not items:
        return {"key": [], "image": None, "label": None, "captions": [], "skipped": skipped}
    return {
        "skipped": skipped,
        "key": [it["key"] for it in items],
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "captions": [it["captions"] for it in items],
    }


def build_eval_loader(eval_set: EvalSet, transform: Callable, batch_size: int, workers: int = 0,
                      rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over this rank's share of `eval_set`, in a deterministic order, no drop_last."""
    if eval_set.kind == "shards":
        dataset = ShardEvalDataset(eval_set.shards, transform, rank, world_size)
    else:
        dataset = ImageFolderEvalDataset(eval_set.path, transform, rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      collate_fn=collate_eval, shuffle=False, drop_last=False)
