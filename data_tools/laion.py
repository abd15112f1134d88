"""LAION-style metadata (URL + caption table) -> the real img2dataset -> WebDataset shards,
plus our sizes.json and manifest.json.

Why img2dataset and not our own writer: downloading at scale (threads per process, timeouts,
retries, X-Robots-Tag opt-outs, resumable shards) is exactly what img2dataset does and what
LAION users already run. This module adds what it lacks: up-front validation of the metadata
file and columns, LAION's quality filters with counts per reason, caption cleaning, a plan
check before reusing a folder, and the shard contract's sizes.json + manifest.json (counts
per failure reason from img2dataset's per-shard parquet statuses, sha256 per shard).

img2dataset's native layout is kept (00000.tar, 00000.parquet, 00000_stats.json; samples
KEY.jpg/.txt/.json): the trainer reads it as it is (docs/architecture.md).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_tools.captions import clean_caption
from data_tools.errors import DataError, Skip
from data_tools.images import DEFAULT_MAX_PIXELS, add_image_arguments, options_from_args
from data_tools.shards import (MANIFEST_NAME, MAX_EXAMPLES_PER_REASON, SIZES_NAME, ShardRecord,
                               atomic_write_text, content_arguments, ensure_writable_dir,
                               sha256_file, write_manifest, write_sizes)

INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl")
PLAN_NAME = ".laion-plan"  # not *.json: img2dataset reads every *.json name as a shard id
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: 00000.tar
# Columns img2dataset adds to every row's metadata: an extra input column of the same name
# would collide with them in its parquet schema.
IMG2DATASET_COLUMNS = {"url", "caption", "key", "status", "error_message", "width", "height",
                       "original_width", "original_height", "exif", "sha256"}
IMG2DATASET_DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")


# ---------------------------------------------------------------- filters


@dataclass(frozen=True)
class Filters:
    """LAION's quality filters; None disables one. Column names are LAION's by default."""

    min_similarity: float | None = None
    similarity_col: str = "similarity"
    nsfw_allowed: tuple[str, ...] | None = None   # LAION-400M's NSFW tag: keep these values
    nsfw_col: str = "NSFW"
    max_punsafe: float | None = None              # LAION-5B's punsafe probability
    punsafe_col: str = "punsafe"
    min_width: int | None = None
    width_col: str = "WIDTH"
    min_height: int | None = None
    height_col: str = "HEIGHT"
    min_caption_chars: int | None = None
    max_caption_chars: int | None = None

    def required_columns(self) -> dict[str, str]:
        """{column: the option that needs it} for the filters that are on."""
        wanted = {self.similarity_col: self.min_similarity, self.nsfw_col: self.nsfw_allowed,
                  self.punsafe_col: self.max_punsafe, self.width_col: self.min_width,
                  self.height_col: self.min_height}
        options = {self.similarity_col: "--min-similarity", self.nsfw_col: "--nsfw-allowed",
                   self.punsafe_col: "--max-punsafe", self.width_col: "--min-width",
                   self.height_col: "--min-height"}
        return {col: options[col] for col, value in wanted.items() if value is not None}


@dataclass
class Filtered:
    """The rows to download (columns url, caption + extras) and why the others were dropped."""

    rows: pd.DataFrame
    skipped: Counter
    examples: dict[str, list]


def filter_rows(table: pd.DataFrame, url_col: str, caption_col: str,
                filters: Filters) -> Filtered:
    """Each dropped row is counted under the first reason that applies, in this order: URL,
    caption, duplicate URL, then the quality filters. A missing or non-numeric value in a
    filtered column fails that filter (it cannot be shown to pass)."""
    reason = pd.Series(pd.NA, index=table.index, dtype=object)
    detail = pd.Series("", index=table.index, dtype=object)

    def drop(mask, why: str, what=None) -> None:
        mask = pd.Series(mask, index=table.index).fillna(True).astype(bool) & reason.isna()
        reason[mask] = why
        if what is not None:
            detail[mask] = what[mask].astype(str)

    urls = table[url_col]
    url_text = urls.map(lambda u: u.strip() if isinstance(u, str) else None)
    drop(url_text.isna() | (url_text == ""), "missing_url")
    drop(~url_text.str.match(r"(?i)https?://", na=False), "invalid_url", urls)

    captions = pd.Series(None, index=table.index, dtype=object)
    caption_skips = pd.Series(None, index=table.index, dtype=object)
    for index, raw in table[caption_col].items():
        try:
            captions[index] = clean_caption(None if _is_missing(raw) else raw)
        except Skip as skip:
            caption_skips[index] = skip.reason
    for why in caption_skips.dropna().unique():
        drop(caption_skips == why, why)
    alive = reason.isna()
    drop(url_text[alive].duplicated().reindex(table.index, fill_value=False), "duplicate_url",
         urls)

    lengths = captions.str.len()
    if filters.min_caption_chars is not None:
        drop(lengths < filters.min_caption_chars, "caption_too_short", lengths)
    if filters.max_caption_chars is not None:
        drop(lengths > filters.max_caption_chars, "caption_too_long", lengths)
    if filters.min_similarity is not None:
        similarity = _numeric(table[filters.similarity_col])
        drop(~(similarity >= filters.min_similarity), "low_similarity", similarity)
    if filters.nsfw_allowed is not None:
        tags = table[filters.nsfw_col]
        drop(~tags.isin(filters.nsfw_allowed), "nsfw", tags)
    if filters.max_punsafe is not None:
        punsafe = _numeric(table[filters.punsafe_col])
        drop(~(punsafe <= filters.max_punsafe), "punsafe", punsafe)
    if filters.min_width is not None:
        width = _numeric(table[filters.width_col])
        drop(~(width >= filters.min_width), "metadata_too_small", width)
    if filters.min_height is not None:
        height = _numeric(table[filters.height_col])
        drop(~(height >= filters.min_height), "metadata_too_small", height)

    kept = reason.isna()
    extras = [c for c in table.columns
              if c not in (url_col, caption_col) and c not in IMG2DATASET_COLUMNS]
    rows = pd.DataFrame({"url": url_text[kept], "caption": captions[kept]})
    for column in extras:
        rows[column] = table.loc[kept, column]
    skipped = Counter(reason[~kept].tolist())
    examples: dict[str, list] = {}
    for index in table.index[~kept]:
        items = examples.setdefault(reason[index], [])
        if len(items) < MAX_EXAMPLES_PER_REASON:
            items.append({"item": f"row {index}", "detail": str(detail[index])})
    return Filtered(rows.reset_index(drop=True), skipped, examples)


def _is_missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _numeric(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce")


# ---------------------------------------------------------------- reading the metadata


def input_format_of(path: Path, given: str | None) -> str:
    if given:
        return given
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in INPUT_FORMATS:
        raise DataError(f"{path}: cannot tell the metadata format from the extension "
                        f"{path.suffix!r}; pass --input-format ({', '.join(INPUT_FORMATS)})")
    return suffix


def read_metadata(path: Path, input_format: str | None = None) -> pd.DataFrame:
    """The whole metadata table, or a one-line DataError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metadata file {path} does not exist")
    fmt = input_format_of(path, input_format)
    try:
        if fmt == "parquet":
            return pq.read_table(path).to_pandas()
        if fmt in ("csv", "tsv"):
            # only empty cells are missing: a caption "NA" or "null" is text
            return pd.read_csv(path, sep="," if fmt == "csv" else "\t", encoding="utf-8",
                               dtype_backend="numpy_nullable", keep_default_na=False,
                               na_values=[""])
        return _read_jsonl(path)
    except DataError:
        raise
    except (pa.ArrowException, pd.errors.ParserError, pd.errors.EmptyDataError, OSError,
            UnicodeDecodeError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: not a readable {fmt} file ({message})") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line; written by hand (not pandas.read_json) so that an error can
    name the line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, "
                                f"got {type(record).__name__}")
            records.append(record)
    return pd.DataFrame.from_records(records)


def check_columns(table: pd.DataFrame, path: Path, url_col: str, caption_col: str,
                  filters: Filters) -> None:
    if table.empty:
        raise DataError(f"metadata file {path} has no rows")
    needed = {url_col: "--url-col", caption_col: "--caption-col", **filters.required_columns()}
    for column, option in needed.items():
        if column not in table.columns:
            raise DataError(f"metadata file {path} has no column {column!r} (needed by {option}); "
                            f"its columns: {', '.join(map(str, table.columns))}")


# ---------------------------------------------------------------- img2dataset


@dataclass(frozen=True)
class DownloadOptions:
    """Everything passed to img2dataset.download besides the input and output paths."""

    image_size: int = 256
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 1
    max_image_area: float = float(DEFAULT_MAX_PIXELS)
    samples_per_shard: int = 10000
    processes: int = 1
    threads: int = 32
    timeout: float = 10.0
    retries: int = 0
    disallowed_header_directives: tuple[str, ...] = IMG2DATASET_DEFAULT_DISALLOWED
    user_agent_token: str | None = None

    def download_kwargs(self) -> dict:
        """Our --max-size means "shorter side down to max-size, never upscaled, 0 keeps the
        size", which is img2dataset's keep_ratio mode with resize_only_if_bigger."""
        return dict(
            image_size=self.image_size or 1,
            resize_mode="keep_ratio" if self.image_size else "no",
            resize_only_if_bigger=True,
            encode_format=self.encode_format,
            encode_quality=self.encode_quality,
            min_image_size=self.min_image_size,
            max_image_area=self.max_image_area,
            number_sample_per_shard=self.samples_per_shard,
            processes_count=self.processes,
            thread_count=self.threads,
            timeout=self.timeout,
            retries=self.retries,
            # img2dataset: None means its default list, an empty list turns the check off
            disallowed_header_directives=list(self.disallowed_header_directives),
            user_agent_token=self.user_agent_token,
            output_format="webdataset",
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            enable_wandb=False,
            incremental_mode="incremental",  # "overwrite" deletes img2dataset's own _tmp folder
            compute_hash="sha256",
        )


def run_img2dataset(rows: pd.DataFrame, out_dir: Path, options: DownloadOptions) -> None:
    """Write the kept rows to a parquet file and let img2dataset download them into out_dir.
    Shards that a previous run finished (their NNNNN_stats.json exists) are not redone."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import phones home otherwise
    import img2dataset  # slow import (cv2, albumentations): only when there is work

    extras = [c for c in rows.columns if c not in ("url", "caption")]
    with tempfile.TemporaryDirectory(prefix="laion-urls-") as tmp:
        url_list = Path(tmp) / "urls.parquet"
        pq.write_table(_to_arrow(rows), url_list)
        img2dataset.download(url_list=str(url_list), output_folder=str(out_dir),
                             save_additional_columns=extras or None,
                             **options.download_kwargs())


def _to_arrow(rows: pd.DataFrame) -> pa.Table:
    """Extra columns that Arrow cannot type (mixed objects from JSON lines) travel as text."""
    columns = {}
    for name in rows.columns:
        try:
            columns[str(name)] = pa.array(rows[name], from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):
            columns[str(name)] = pa.array(rows[name].map(
                lambda v: None if _is_missing(v) else json.dumps(v, default=str)))
    return pa.table(columns)


# ---------------------------------------------------------------- summarising its output


def failure_reason(status: str, message: str | None) -> str:
    """img2dataset's free-text errors -> short snake_case reasons for the manifest."""
    text = (message or "").lower()
    if status == "failed_to_download":
        http = re.search(r"http error (\d{3})", text)
        if http:
            return f"http_{http.group(1)}"
        if "timed out" in text or "timeout" in text:
            return "timeout"
        if "x-robots-tag" in text:
            return "disallowed_by_x_robots_tag"
        if "hash mismatch" in text:
            return "hash_mismatch"
        if "urlopen error" in text or "connection" in text or "remote end closed" in text:
            return "connection_error"
        return "download_error"
    if "decoding error" in text:
        return "corrupt_image"
    if "image too small" in text:
        return "image_too_small"
    if "area too large" in text:
        return "decompression_bomb"
    return "resize_error"


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}"


def summarise_shard(out_dir: Path, shard: int) -> ShardRecord:
    """One finished shard's record from its parquet (one row per input row, with status)."""
    name = shard_name(shard)
    table = pq.read_table(out_dir / f"{name}.parquet",
                          columns=["url", "status", "error_message"]).to_pandas()
    successes = int((table["status"] == "success").sum())
    skipped: Counter = Counter()
    examples: dict[str, list] = {}
    for row in table[table["status"] != "success"].itertuples():
        why = failure_reason(row.status, row.error_message)
        skipped[why] += 1
        items = examples.setdefault(why, [])
        if len(items) < MAX_EXAMPLES_PER_REASON:
            items.append({"shard": f"{name}.tar", "item": row.url, "detail": row.error_message})
    tar = out_dir / f"{name}.tar"
    return ShardRecord(name=tar.name, count=successes, sha256=sha256_file(tar),
                       bytes=tar.stat().st_size, skipped=dict(sorted(skipped.items())),
                       skipped_examples=examples)


def finished_shards(out_dir: Path) -> set[int]:
    """Shards img2dataset completed: it writes NNNNN_stats.json last, after closing the tar."""
    return {int(Path(p).name.split("_")[0])
            for p in glob.glob(str(out_dir / f"{'[0-9]' * SHARD_DIGITS}_stats.json"))}


def img2dataset_status_counts(out_dir: Path, shards) -> dict[str, int]:
    """img2dataset's own status_dict, summed over shards: its raw messages, for the record."""
    total: Counter = Counter()
    for shard in shards:
        stats = json.loads((out_dir / f"{shard_name(shard)}_stats.json").read_text())
        total.update(stats.get("status_dict", {}))
    return dict(total.most_common())


# ---------------------------------------------------------------- the plan of an output folder


def plan_fingerprint(rows: pd.DataFrame, options: DownloadOptions) -> str:
    """Identifies what a folder holds: the exact rows to download and the download options
    that change the bytes of the shards (not processes, threads, timeout or retries)."""
    digest = hashlib.sha256()
    row_hashes = pd.util.hash_pandas_object(rows[["url", "caption"]], index=False)
    digest.update(row_hashes.values.tobytes())
    identity = {k: v for k, v in asdict(options).items()
                if k not in ("processes", "threads", "timeout", "retries")}
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def img2dataset_files(out_dir: Path) -> list[Path]:
    patterns = [f"{'[0-9]' * SHARD_DIGITS}{suffix}"
                for suffix in (".tar", ".parquet", "_stats.json")]
    return sorted(p for pattern in patterns for p in out_dir.glob(pattern))


def prepare_output(out_dir: Path, fingerprint: str, overwrite: bool) -> None:
    """Refuse (or with --overwrite, clear) a folder that holds another download; drop our
    derived files, which img2dataset would otherwise try to parse as shard stats."""
    plan_file = out_dir / PLAN_NAME
    previous = plan_file.read_text().strip() if plan_file.is_file() else None
    existing = img2dataset_files(out_dir)
    if existing and previous != fingerprint:
        if not overwrite:
            raise DataError(f"{out_dir} holds shards of a different download (other metadata, "
                            "filters or image options); use an empty folder or pass --overwrite")
        for path in existing:
            path.unlink()
    for name in (SIZES_NAME, MANIFEST_NAME):
        (out_dir / name).unlink(missing_ok=True)
    atomic_write_text(plan_file, fingerprint + "\n")


# ---------------------------------------------------------------- the converter


def convert(metadata: Path, out_dir: Path, *, url_col: str = "URL", caption_col: str = "TEXT",
            input_format: str | None = None, filters: Filters = Filters(),
            options: DownloadOptions = DownloadOptions(), overwrite: bool = False,
            arguments: dict | None = None) -> dict:
    """The whole `laion` subcommand: validate, filter, download, write sizes and manifest.
    Returns the manifest. A rerun of the same command resumes (finished shards are kept)."""
    table = read_metadata(metadata, input_format)
    check_columns(table, metadata, url_col, caption_col, filters)
    filtered = filter_rows(table, url_col, caption_col, filters)
    if filtered.rows.empty:
        raise DataError(f"{metadata}: no row left after filtering "
                        f"({_counts_text(filtered.skipped)})")
    out_dir = ensure_writable_dir(out_dir)
    fingerprint = plan_fingerprint(filtered.rows, options)
    prepare_output(out_dir, fingerprint, overwrite)

    num_shards = math.ceil(len(filtered.rows) / options.samples_per_shard)
    if not set(range(num_shards)) <= finished_shards(out_dir):
        run_img2dataset(filtered.rows, out_dir, options)
    done = finished_shards(out_dir)
    missing = [shard_name(s) for s in range(num_shards) if s not in done]
    records = [summarise_shard(out_dir, s) for s in range(num_shards) if s in done]

    write_sizes(out_dir, {r.name: r.count for r in records})
    manifest = write_manifest(
        out_dir, source="laion", arguments=arguments or {}, records=records, plan=fingerprint,
        pre_skipped=filtered.skipped, pre_skipped_examples=filtered.examples,
        extra={"metadata_rows": len(table), "downloaded_rows": len(filtered.rows),
               "img2dataset": {"version": _img2dataset_version(),
                               "status_counts": img2dataset_status_counts(out_dir, done),
                               "unfinished_shards": missing}})
    if missing:
        raise DataError(f"img2dataset did not finish shard(s) {', '.join(missing)} in {out_dir}; "
                        "rerun the same command to retry them")
    return manifest


def _counts_text(counts: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())


def _img2dataset_version() -> str:
    from importlib.metadata import version
    return version("img2dataset")


# ---------------------------------------------------------------- command line


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "laion", help="download LAION-style URL+caption metadata with img2dataset",
        description="Validate and filter a LAION-style metadata file (parquet, csv, tsv or "
                    "jsonl), download it with img2dataset into WebDataset shards (00000.tar, "
                    "...), then add sizes.json and manifest.json. Rerun to resume.")
    parser.add_argument("metadata", type=Path, help="metadata file (parquet, csv, tsv, jsonl)")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--input-format", choices=INPUT_FORMATS,
                        help="default: from the file extension")
    parser.add_argument("--url-col", default="URL", help="URL column (default: URL)")
    parser.add_argument("--caption-col", default="TEXT", help="caption column (default: TEXT)")

    group = parser.add_argument_group("filters (off unless given)")
    group.add_argument("--min-similarity", type=float, help="keep rows with similarity >= this")
    group.add_argument("--similarity-col", default="similarity")
    group.add_argument("--nsfw-allowed", type=_comma_list,
                       help="keep rows whose NSFW tag is one of these, e.g. UNLIKELY,UNSURE")
    group.add_argument("--nsfw-col", default="NSFW")
    group.add_argument("--max-punsafe", type=float, help="keep rows with punsafe <= this")
    group.add_argument("--punsafe-col", default="punsafe")
    group.add_argument("--min-width", type=int, help="keep rows whose WIDTH column is >= this")
    group.add_argument("--width-col", default="WIDTH")
    group.add_argument("--min-height", type=int, help="keep rows whose HEIGHT column is >= this")
    group.add_argument("--height-col", default="HEIGHT")
    group.add_argument("--min-caption-chars", type=int, help="after whitespace clean-up")
    group.add_argument("--max-caption-chars", type=int)

    add_image_arguments(parser)
    group = parser.add_argument_group("download (img2dataset)")
    group.add_argument("--samples-per-shard", type=int, default=10000,
                       help="rows per shard, failures included (default 10000)")
    group.add_argument("--workers", type=int, default=1, help="download processes (default 1)")
    group.add_argument("--threads", type=int, default=32,
                       help="download threads per process (default 32)")
    group.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    group.add_argument("--retries", type=int, default=0, help="extra tries per failed URL")
    group.add_argument("--disallowed-header-directives", type=_comma_list,
                       default=list(IMG2DATASET_DEFAULT_DISALLOWED),
                       help="X-Robots-Tag directives that make img2dataset skip an image "
                            "(default: noai,noimageai,noindex,noimageindex; '' honours none)")
    group.add_argument("--user-agent-token", help="added to the User-Agent (img2dataset's)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace shards of a different download in the output folder")
    parser.set_defaults(func=run)


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def options_from_cli(args: argparse.Namespace) -> tuple[Filters, DownloadOptions]:
    image = options_from_args(args)  # validates --max-size, --quality, ... (DataError)
    for option, value, least in (("--samples-per-shard", args.samples_per_shard, 1),
                                 ("--workers", args.workers, 1), ("--threads", args.threads, 1),
                                 ("--retries", args.retries, 0)):
        if value < least:
            raise DataError(f"{option} must be at least {least}, got {value}")
    if args.timeout <= 0:
        raise DataError(f"--timeout must be positive, got {args.timeout}")
    filters = Filters(
        min_similarity=args.min_similarity, similarity_col=args.similarity_col,
        nsfw_allowed=tuple(args.nsfw_allowed) if args.nsfw_allowed is not None else None,
        nsfw_col=args.nsfw_col, max_punsafe=args.max_punsafe, punsafe_col=args.punsafe_col,
        min_width=args.min_width, width_col=args.width_col, min_height=args.min_height,
        height_col=args.height_col, min_caption_chars=args.min_caption_chars,
        max_caption_chars=args.max_caption_chars)
    options = DownloadOptions(
        image_size=image.max_size, encode_format=image.format, encode_quality=image.quality,
        min_image_size=image.min_size, max_image_area=float(image.max_pixels),
        samples_per_shard=args.samples_per_shard, processes=args.workers, threads=args.threads,
        timeout=args.timeout, retries=args.retries,
        disallowed_header_directives=tuple(args.disallowed_header_directives),
        user_agent_token=args.user_agent_token)
    return filters, options


def run(args: argparse.Namespace) -> int:
    filters, options = options_from_cli(args)
    arguments = content_arguments(args)  # what defines the content: not workers, out, ...
    manifest = convert(args.metadata, args.out, url_col=args.url_col,
                       caption_col=args.caption_col, input_format=args.input_format,
                       filters=filters, options=options, overwrite=args.overwrite,
                       arguments=arguments)
    print(f"laion: {manifest['written']} samples in {len(manifest['shards'])} shards -> "
          f"{args.out}; skipped {sum(manifest['skipped'].values())} "
          f"({_counts_text(Counter(manifest['skipped'])) or 'none'})")
    return 0
