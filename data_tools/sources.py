"""What the file-based converters share: an image-text record, the writer Source that turns a
list of records into samples, and strict loading of annotation files.

A converter (coco, karpathy, csv, folder) reads its annotations up front, validates them
(DataError naming the file and key) and produces `Record`s; `RecordSource` then builds each
sample in whatever worker process writes its shard.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.captions import clean_captions
from data_tools.errors import DataError, Skip
from data_tools.images import ImageOptions, prepare_image_file
from data_tools.shards import content_arguments, writer_from_args


@dataclass(frozen=True)
class Record:
    """One planned sample: an image file, its raw captions, and metadata for KEY.json.

    `skip` marks a record already known to be bad while planning (e.g. a duplicate id): it keeps
    its place in the plan, so that keys stay stable, and is counted under that reason.
    """

    image: Path
    captions: tuple = ()
    meta: dict = field(default_factory=dict)
    label: int | None = None
    skip: str | None = None


@dataclass
class RecordSource:
    """A writer Source over records: image prepared by images.py, captions by captions.py."""

    records: list[Record]
    options: ImageOptions
    source: str
    require_caption: bool = True
    pre_skipped: Counter = field(default_factory=Counter)
    pre_skipped_examples: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, index: int) -> str:
        record = self.records[index]
        ident = {k: v for k, v in record.meta.items() if k.endswith("id")}
        return f"{record.image}" + (f" {ident}" if ident else "")

    def sample(self, index: int) -> dict[str, bytes]:
        record = self.records[index]
        if record.skip:
            raise Skip(record.skip, str(record.meta))
        name = str(record.image)
        try:
            captions = clean_captions(record.captions, name)
        except Skip:
            if self.require_caption:
                raise
            captions = []  # labelled sets: the class is the annotation, a caption is extra
        image = prepare_image_file(record.image, self.options)
        meta = {**record.meta, "captions": captions, "source": self.source,
                "width": image.width, "height": image.height,
                "original_width": image.original_width, "original_height": image.original_height}
        members = {image.ext: image.data, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8", "backslashreplace")}
        if captions:
            members["txt"] = captions[0].encode()
        if record.label is not None:
            members["cls"] = str(record.label).encode()
        return members


def load_json(path: Path):
    """Parse a JSON file, or stop with a one-line DataError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 JSON: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column "
                        f"{e.colno}") from None


def require(mapping, key: str, kind: type, where: str):
    """mapping[key] as `kind`, or a DataError naming the file and key."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise DataError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: {key!r} must be a {getattr(kind, '__name__', kind)}, got "
                        f"{type(value).__name__}")
    return value


def optional(mapping: dict, key: str, kind, where: str, default=None):
    """mapping[key] when present and not null, as `kind` (a type or a tuple of types; bool is
    never an int here), else `default`; a wrong type is a DataError naming the file and key."""
    value = mapping.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: {key!r} must be {names}, got {type(value).__name__} "
                        f"{json.dumps(value)[:60]}")
    return value


ID_TYPES = (int, str)  # what COCO and Karpathy files use as image ids


def existing_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder")
    return path


def print_summary(manifest: dict, out: Path) -> None:
    """The one line a converter prints when done."""
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
    print(f"{manifest['written']} samples in {len(manifest['shards'])} shards -> {out} "
          f"(skipped: {skipped})")


def write_records(args, out: Path, records: list, options: ImageOptions, source: str, *,
                  arguments: dict | None = None, extra_manifest: dict | None = None,
                  **source_options) -> dict:
    """What every file converter ends with: its records -> a shard set in `out` (ShardSetWriter,
    options from the command line) -> the summary line. Returns the manifest."""
    manifest = writer_from_args(
        args, out, source=source,
        arguments=content_arguments(args) if arguments is None else arguments,
    ).write(RecordSource(records, options, source, **source_options), extra_manifest)
    print_summary(manifest, out)
    return manifest
