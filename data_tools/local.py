"""Local sets. `clip-data csv`: a table (CSV, TSV, JSONL or parquet) of image path + caption ->
shards. `clip-data folder`: an ImageFolder tree (one folder per class) -> a labelled evaluation
set (KEY.cls, classnames.txt, templates) in the layout clip_benchmark reads."""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections import Counter
from pathlib import Path

from data_tools.errors import DataError
from data_tools.images import add_image_arguments, options_from_args
from data_tools.shards import (add_writer_arguments, atomic_write_text, ensure_writable_dir,
                               plain_name, write_label_files)
from data_tools.sources import Record, existing_dir, write_records

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
CSV_FIELD_LIMIT = 1 << 30  # bytes per field; the default is 128 KiB
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a blurry photo of a {c}.", "a photo of the {c}.",
                     "a close-up photo of a {c}.", "a bright photo of a {c}.",
                     "a good photo of a {c}.")


# ---------------------------------------------------------------- tables


def read_table_rows(path: Path, fmt: str) -> tuple[list[str] | None, list]:
    """(header or None for JSONL, rows). CSV/TSV rows are dicts, or None where the row has the
    wrong number of fields; JSONL rows are dicts, or None where the line is not a JSON object.
    A file that cannot be read as the format at all is a DataError."""
    try:
        if fmt == "parquet":
            import pandas

            frame = pandas.read_parquet(path)
            return list(frame.columns), frame.to_dict("records")
        # surrogateescape: one row with bad bytes becomes a counted non_utf8_caption skip
        # (captions.py detects the escapes) instead of failing the whole table
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            if fmt == "jsonl":
                return None, [_json_object(line) for line in f if line.strip()]
            # the csv module stops at fields over 128 KiB by default: one long caption must
            # not stop the table (captions.py and the tokenizer deal with its length)
            csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
            reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
            header = next(reader, None)
            if not header:
                raise DataError(f"{path} is empty: expected a header row")
            return header, [dict(zip(header, row)) if len(row) == len(header) else None
                            for row in reader if row]
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except csv.Error as e:
        raise DataError(f"{path} is not valid {fmt.upper()}: {e}") from None
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataError(f"{path} cannot be read as {fmt}: {str(e).splitlines()[0]}") from None


def _json_object(line: str):
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def read_table(path: Path, image_column: str, caption_column: str, image_root: Path,
               fmt: str = "auto", id_column: str | None = None) -> list[Record]:
    """Records in row order; bad rows keep their place as skips ("malformed_row",
    "missing_image_path", "duplicate_id") so that keys do not shift."""
    fmt = TABLE_FORMATS.get(path.suffix.lower()) if fmt == "auto" else fmt
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the extension; pass --format")
    header, rows = read_table_rows(path, fmt)
    columns = [image_column, caption_column] + ([id_column] if id_column else [])
    if header is not None:
        for column in columns:
            if column not in header:
                raise DataError(f"{path}: no column {column!r} (columns: {', '.join(header)})")
    elif rows and all(r is None or image_column not in r for r in rows):
        raise DataError(f"{path}: no row has the key {image_column!r}")
    records, seen = [], set()
    for number, row in enumerate(rows, start=1):
        meta = {"row": number}
        if row is None:
            records.append(Record(Path(f"{path.name}:{number}"), meta=meta, skip="malformed_row"))
            continue
        image = row.get(image_column)
        if not isinstance(image, str) or not image.strip():
            records.append(Record(Path(f"{path.name}:{number}"), meta=meta,
                                  skip="missing_image_path"))
            continue
        ident = row.get(id_column) if id_column else None
        if id_column:
            meta["id"] = ident
        skip = "duplicate_id" if id_column and ident in seen else None
        seen.add(ident)
        records.append(Record(image_root / image.strip(), (row.get(caption_column),), meta,
                              skip=skip))
    return records


def add_csv_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "csv", help="CSV/TSV/JSONL/parquet table of image path + caption -> shards")
    parser.add_argument("table", type=Path, help="the table file")
    parser.add_argument("out", type=Path, help="output folder for the shard set")
    parser.add_argument("--format", choices=["auto"] + sorted(set(TABLE_FORMATS.values())),
                        default="auto", help="table format (default: from the extension)")
    parser.add_argument("--image-column", default="filepath",
                        help="column holding the image path (default: %(default)s)")
    parser.add_argument("--caption-column", default="caption",
                        help="column holding the caption (default: %(default)s)")
    parser.add_argument("--id-column", default=None,
                        help="optional unique id column; repeated ids are skipped")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="folder that relative image paths start from (default: the "
                             "table's folder)")
    add_image_arguments(parser)
    add_writer_arguments(parser)
    parser.set_defaults(func=run_csv)


def run_csv(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    ensure_writable_dir(args.out)
    root = existing_dir(args.image_root or args.table.parent, "--image-root")
    records = read_table(args.table, args.image_column, args.caption_column, root,
                         args.format, args.id_column)
    write_records(args, args.out, records, options, "csv")
    return 0


# ---------------------------------------------------------------- image folders


def read_image_folder(root: Path) -> tuple[list[str], list[Record], Counter, dict]:
    """(class folder names, records, dropped counts, examples): classes are the sorted
    subfolders of root, files under each (recursively, sorted) with an image extension; other
    files are counted as "not_an_image"."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders (expected ROOT/<class>/<image>)")
    records, dropped, examples = [], Counter(), {}
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_dir() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                dropped["not_an_image"] += 1
                examples.setdefault("not_an_image", []).append({"item": str(path), "detail": ""})
                continue
            meta = {"file": str(path.relative_to(root)), "classname": _display_name(name)}
            records.append(Record(path, (_display_name(name),), meta, label=label))
    return classes, records, dropped, examples


def _display_name(folder: str) -> str:
    return folder.replace("_", " ")


def read_templates(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    try:
        templates = [t.strip() for t in path.read_text(encoding="utf-8").splitlines()
                     if t.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read templates {path}: {e}") from None
    if not templates:
        raise DataError(f"{path} holds no templates")
    return templates


def add_folder_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "folder", help="ImageFolder tree (class = folder) -> labelled evaluation set",
        description="Writes OUT/<split>/ shards with KEY.cls, plus classnames.txt and "
                    "zeroshot_classification_templates.txt in OUT/ and OUT/<split>/, "
                    "nshards.txt and 0.tar.. links: the layout clip_benchmark reads.")
    parser.add_argument("root", type=Path, help="ROOT/<class>/<image> tree")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--split", default="test", help="split folder name (default: test)")
    parser.add_argument("--templates", type=Path, default=None,
                        help="text file, one zero-shot template per line with {c}")
    add_image_arguments(parser)
    add_writer_arguments(parser)
    parser.set_defaults(func=run_folder)


def run_folder(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    templates = read_templates(args.templates)
    root = existing_dir(args.root, "image folder")
    out = ensure_writable_dir(args.out / plain_name(args.split, "--split"))
    classes, records, dropped, examples = read_image_folder(root)
    manifest = write_records(args, out, records, options, "folder",
                             extra_manifest={"classes": len(classes)}, require_caption=False,
                             pre_skipped=dropped, pre_skipped_examples=examples)
    classnames = [_display_name(c) for c in classes]
    for folder in (args.out, out):
        write_label_files(folder, classnames, templates)
    link_clip_benchmark_names(out, [s["name"] for s in manifest["shards"]])
    return 0


def link_clip_benchmark_names(folder: Path, shard_names: list[str]) -> None:
    """clip_benchmark reads SPLIT/nshards.txt and SPLIT/0.tar, 1.tar, ...: relative links."""
    for number, name in enumerate(shard_names):
        link = folder / f"{number}.tar"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(name, link)
    atomic_write_text(folder / "nshards.txt", f"{len(shard_names)}\n")


def add_parser(subparsers) -> None:
    add_csv_parser(subparsers)
    add_folder_parser(subparsers)
