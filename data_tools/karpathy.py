"""`clip-data karpathy`: Karpathy splits (dataset_coco.json, dataset_flickr30k.json) -> one shard
set per split under OUT/<split>/. Every sample keeps all its captions in json "captions" (the
test split is what COCO-5k / Flickr30k-1k retrieval reads: 5 captions per image)."""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from data_tools.errors import DataError
from data_tools.images import add_image_arguments, options_from_args
from data_tools.shards import (add_writer_arguments, content_arguments, ensure_writable_dir,
                               plain_name)
from data_tools.sources import (ID_TYPES, Record, existing_dir, load_json, optional, require,
                                write_records)


def read_karpathy(path: Path, image_root: Path) -> tuple[str, dict[str, list[Record]]]:
    """(dataset name, {split: records in file order}). An image is
    image_root/filepath/filename (flickr30k has no filepath); a repeated image within a split
    is kept once (the first) and counted as "duplicate_id". A split value becomes a folder
    name under the output folder, so it must be a plain name; a key of the wrong type is a
    DataError naming the file, entry and key."""
    data = load_json(path)
    images = require(data, "images", list, str(path))
    dataset = data.get("dataset", "karpathy") if isinstance(data, dict) else "karpathy"
    splits: dict[str, list[Record]] = defaultdict(list)
    seen = defaultdict(set)
    for position, img in enumerate(images):
        where = f"{path}: images[{position}]"
        split = require(img, "split", str, where)
        plain_name(split, f"{where}: 'split'")
        filename = require(img, "filename", str, where)
        sentences = require(img, "sentences", list, where)
        relative = Path(optional(img, "filepath", str, where, "")) / filename
        ident = optional(img, "cocoid", ID_TYPES, where)
        if ident is None:
            ident = optional(img, "imgid", ID_TYPES, where, position)
        meta = {"image_id": ident, "filename": str(relative), "split": split,
                "dataset": dataset}
        captions = tuple(s.get("raw") if isinstance(s, dict) else None for s in sentences)
        skip = "duplicate_id" if relative in seen[split] else None
        seen[split].add(relative)
        splits[split].append(Record(image_root / relative, captions, meta, skip=skip))
    return dataset, dict(splits)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "karpathy", help="Karpathy split json -> one shard set per split (OUT/<split>/)")
    parser.add_argument("out", type=Path, help="output folder (one subfolder per split)")
    parser.add_argument("--annotations", type=Path, required=True,
                        help="dataset_coco.json or dataset_flickr30k.json")
    parser.add_argument("--images", type=Path, required=True,
                        help="image root: COCO's folder holding train2014/ and val2014/, or "
                             "Flickr30k's image folder")
    parser.add_argument("--splits", default=None,
                        help="comma-separated splits to write (default: all in the file)")
    add_image_arguments(parser)
    add_writer_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    ensure_writable_dir(args.out)
    existing_dir(args.images, "--images")
    dataset, splits = read_karpathy(args.annotations, args.images)
    wanted = args.splits.split(",") if args.splits else sorted(splits)
    missing = [s for s in wanted if s not in splits]
    if missing:
        raise DataError(f"{args.annotations} has no split {missing[0]!r} "
                        f"(it has: {', '.join(sorted(splits))})")
    for split in wanted:
        arguments = {**content_arguments(args), "split": split}
        arguments.pop("splits")  # writing test now and train later is the same train set
        write_records(args, args.out / split, splits[split], options, f"karpathy-{dataset}",
                      arguments=arguments)
    return 0
