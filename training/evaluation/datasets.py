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
    """Describe the evaluation set at `path`, checking it first: a shard folder, an ImageFolder
    tree, or shard files as a brace pattern (`DIR/val-{000000..000003}.tar`, `::`-joined lists
    allowed; class names and templates are then read from the first shard's folder). A folder
    without shards whose one subfolder holds them (what `clip-data folder` and clip_benchmark
    write: OUT/classnames.txt + OUT/test/) is read through that split."""
    if str(path).endswith(".tar"):
        return _shard_pattern_set(str(path))
    path = Path(path)
    if not path.is_dir():
        raise EvalDataError(f"{path}: evaluation set not found (expected a folder of .tar shards "
                            f"or an ImageFolder tree)")
    shards = shard_files(path)
    if not shards:
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and shard_files(p))
        if len(splits) == 1:
            return open_eval_set(path / splits[0])
        if splits:
            raise EvalDataError(f"{path} holds the shard splits {', '.join(splits)}: name one "
                                f"(e.g. {path / splits[0]})")
    classnames = _read_lines(path / CLASSNAMES_FILE)
    templates = _read_lines(path / TEMPLATES_FILE)
    if templates is not None:
        bad = [t for t in templates if "{c}" not in t and "{}" not in t]
        if bad:
            raise EvalDataError(f"{path / TEMPLATES_FILE}: template without '{{c}}' (or '{{}}'): "
                                f"{bad[0]!r}")
    if shards:
        return EvalSet(path, "shards", shards, classnames, templates)
    class_dirs = sorted(p.name for p in path.iterdir() if p.is_dir())
    if class_dirs:
        return EvalSet(path, "imagefolder", [], classnames or class_dirs, templates)
    raise EvalDataError(f"{path}: no .tar shards and no class folders")


def shard_files(folder: Path) -> list[str]:
    """The folder's .tar shards, each file once: clip_benchmark's 0.tar, 1.tar, ... links (which
    `clip-data folder` writes) name shards that are already in the folder."""
    chosen: dict[Path, Path] = {}
    for p in sorted(folder.glob("*.tar"), key=lambda p: (p.is_symlink(), p.name)):
        if p.is_file():
            chosen.setdefault(p.resolve(), p)
    return sorted(str(p) for p in chosen.values())


def _shard_pattern_set(spec: str) -> EvalSet:
    from braceexpand import braceexpand  # webdataset's own dependency, same pattern syntax

    try:
        shards = [url for part in spec.split("::") for url in braceexpand(part)]
    except ValueError as e:  # braceexpand.UnbalancedBracesError
        raise EvalDataError(f"{spec}: not a shard pattern: {e}") from None
    missing = [url for url in shards if not Path(url).is_file()]
    if missing:
        raise EvalDataError(f"{spec}: shard {missing[0]} not found"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    folder = Path(shards[0]).parent
    return EvalSet(folder, "shards", shards, _read_lines(folder / CLASSNAMES_FILE),
                   _read_lines(folder / TEMPLATES_FILE))


def _read_lines(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reader_share(n_shards: int, rank: int, world_size: int, whole_stream: bool = False
                 ) -> tuple[int, int, int, int]:
    """Which part this (rank, worker) reads: (shard_start, shard_step, sample_start, sample_step).

    With at least one shard per reader the shards are dealt out (no tar is opened twice);
    with fewer shards than readers, or when `whole_stream` is asked (a sample cap counts
    samples across all shards), every reader walks all shards and keeps every n-th sample.
    Either way each sample goes to exactly one reader.
    """
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    reader, readers = rank * workers + worker, world_size * workers
    if n_shards >= readers and not whole_stream:
        return reader, readers, 0, 1
    return 0, 1, reader, readers


class ShardEvalDataset(IterableDataset):
    """This rank's share of a shard set as dicts {key, image, label, captions}.

    A sample that cannot be used is yielded as {"skip": reason} so that the count survives
    loader worker processes; `collate_eval` drops it and counts it per reason.
    """

    def __init__(self, shards: list[str], transform: Callable, rank: int = 0, world_size: int = 1,
                 max_samples: int | None = None):
        self.shards, self.transform = shards, transform
        self.rank, self.world_size, self.max_samples = rank, world_size, max_samples

    def __iter__(self) -> Iterator[dict]:
        shard_start, shard_step, sample_start, sample_step = reader_share(
            len(self.shards), self.rank, self.world_size, whole_stream=self.max_samples is not None)
        urls = self.shards[shard_start::shard_step]
        samples = wds.tarfile_samples([{"url": u} for u in urls])
        for index, raw in enumerate(samples):
            if self.max_samples is not None and index >= self.max_samples:
                return
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

    def __init__(self, root: Path, transform: Callable, rank: int = 0, world_size: int = 1,
                 max_samples: int | None = None):
        from torchvision.datasets import ImageFolder  # torchvision's class order and extensions

        self.folder = ImageFolder(str(root))
        total = len(self.folder.samples) if max_samples is None else min(
            max_samples, len(self.folder.samples))
        self.indices = list(range(rank, total, world_size))
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
                      rank: int = 0, world_size: int = 1, max_samples: int | None = None
                      ) -> DataLoader:
    """A loader over this rank's share of `eval_set` (the first `max_samples` samples in shard
    order when given), deterministic, no drop_last."""
    if eval_set.kind == "shards":
        dataset = ShardEvalDataset(eval_set.shards, transform, rank, world_size, max_samples)
    else:
        dataset = ImageFolderEvalDataset(eval_set.path, transform, rank, world_size, max_samples)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      collate_fn=collate_eval, shuffle=False, drop_last=False)
