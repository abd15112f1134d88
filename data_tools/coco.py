"""`clip-data coco`: COCO captions (captions_train2017.json / captions_val2014.json + the image
folder) -> one sample per image: the image, txt = its first caption, json = all its captions,
image id, file name, source and sizes."""
from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

from data_tools.images import add_image_arguments, options_from_args
from data_tools.shards import add_writer_arguments, ensure_writable_dir
from data_tools.sources import (ID_TYPES, Record, existing_dir, load_json, optional, require,
                                write_records)


def read_coco_captions(path: Path, image_dir: Path) -> tuple[list[Record], Counter, dict]:
    """Records in the file's image order, plus counts of what was dropped while planning.

    Duplicate image ids keep their place in the plan as skips (the first one wins); entries
    without id/file_name are skipped as "malformed_entry"; captions naming an unknown image id
    are counted as "annotation_without_image". An id that is neither an int nor a string is a
    DataError naming the file, entry and key.
    """
    data = load_json(path)
    images = require(data, "images", list, str(path))
    annotations = require(data, "annotations", list, str(path))
    captions = defaultdict(list)
    known = {optional(img, "id", ID_TYPES, f"{path}: images[{position}]")
             for position, img in enumerate(images) if isinstance(img, dict)}
    dropped, examples = Counter(), {}
    for position, ann in enumerate(annotations):
        if isinstance(ann, dict):
            optional(ann, "image_id", ID_TYPES, f"{path}: annotations[{position}]")
        if not isinstance(ann, dict) or "image_id" not in ann or ann["image_id"] not in known:
            dropped["annotation_without_image"] += 1
            examples.setdefault("annotation_without_image", []).append(
                {"item": f"annotations[{position}]", "detail": str(ann)[:200]})
            continue
        captions[ann["image_id"]].append((ann.get("id", position), ann.get("caption")))
    records, seen = [], set()
    for position, img in enumerate(images):
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) \
                or "id" not in img:
            records.append(Record(Path(f"images[{position}]"), meta={"entry": position},
                                  skip="malformed_entry"))
            continue
        meta = {"image_id": img["id"], "file_name": img["file_name"]}
        skip = "duplicate_id" if img["id"] in seen else None
        seen.add(img["id"])
        ordered = tuple(c for _, c in sorted(captions.get(img["id"], []), key=_annotation_order))
        records.append(Record(image_dir / img["file_name"], ordered, meta, skip=skip))
    return records, dropped, examples


def _annotation_order(item):
    ann_id, _ = item
    return (0, ann_id, "") if isinstance(ann_id, int) else (1, 0, str(ann_id))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "coco", help="COCO captions json + image folder -> shards (one sample per image)")
    parser.add_argument("out", type=Path, help="output folder for the shard set")
    parser.add_argument("--captions", type=Path, required=True,
                        help="captions_train2017.json, captions_val2014.json, ...")
    parser.add_argument("--images", type=Path, required=True,
                        help="the folder holding the json's file_name entries")
    add_image_arguments(parser)
    add_writer_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    ensure_writable_dir(args.out)
    existing_dir(args.images, "--images")
    records, dropped, examples = read_coco_captions(args.captions, args.images)
    write_records(args, args.out, records, options, "coco", pre_skipped=dropped,
                  pre_skipped_examples=examples)
    return 0

