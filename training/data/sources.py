"""Where training shards come from: source specs, opening a shard URL, and per-shard sample counts.

A source spec is what users write in `data.train`: brace-expanded shard lists (local paths,
`pipe:` commands, fsspec URLs), several joined with `::`, e.g.
`/data/cc3m/shard-{000000..000331}.tar::pipe:aws s3 cp s3://b/laion-{0000..9999}.tar -`.
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO, Iterable, Sequence

import braceexpand
import fsspec
import webdataset

from .config import SOURCE_SEPARATOR

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 60


class DataError(ValueError):
    """An expected problem with the data or its configuration; the message is one line naming the
    file, key or value, so the trainer prints it without a traceback."""


@dataclass(frozen=True)
class Source:
    """One `::`-separated part of a spec: its shard URLs and its sampling weight."""
    spec: str
    urls: tuple[str, ...]
    weight: float = 1.0


def parse_sources(spec: str, weights: Sequence[float] | None = None) -> list[Source]:
    """Split a spec on `::`, brace-expand each part, and attach the weights (default 1 each).

    `spec` and `weights` as DataConfig.validate accepted them (it owns the rules of data.train and
    data.train_weights); here: local shards exist, fsspec filesystems are installed."""
    parts = [part.strip() for part in spec.split(SOURCE_SEPARATOR)]
    weights = [1.0] * len(parts) if weights is None else [float(w) for w in weights]
    sources = [Source(part, tuple(braceexpand.braceexpand(part)), w) for part, w in zip(parts, weights)]
    urls = [url for source in sources for url in source.urls]
    check_local_shards_exist(urls)
    check_url_schemes(urls)
    return sources


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def check_local_shards_exist(urls: Iterable[str]) -> None:
    """Fail before any work when local shards are missing (remote ones fail when read)."""
    missing = [url for url in urls if is_local(url) and not os.path.isfile(url)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"data.train: shard not found: {missing[0]}{more}")


def check_url_schemes(urls: Iterable[str]) -> None:
    """Fail before any work when an fsspec URL's filesystem is not installed (s3fs, gcsfs, ...)."""
    schemes = {url.split("://", 1)[0] for url in urls if not url.startswith("pipe:") and "://" in url}
    for scheme in sorted(schemes - {"http", "https"}):
        try:
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as exn:
            raise DataError(f"data.train: cannot open {scheme}:// URLs: {str(exn).splitlines()[0]}") from None


def _fsspec_has_http() -> bool:
    return importlib.util.find_spec("aiohttp") is not None


def open_url(url: str) -> IO[bytes]:
    """Open a shard or a side file for streaming reads.

    `pipe:CMD` runs CMD and reads its stdout (webdataset's Pipe checks the exit status on close);
    a plain path is a local file; anything with a scheme goes through fsspec (s3://, gs://, file://,
    ...). fsspec's HTTP filesystem needs aiohttp, which is not a dependency of this project, so
    http(s) falls back to the standard library's streaming urlopen when aiohttp is absent.
    """
    if url.startswith("pipe:"):
        return webdataset.gopen(url, "rb")
    if is_local(url):
        return open(url, "rb")
    if url.startswith(("http://", "https://")) and not _fsspec_has_http():
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    return fsspec.open(url, "rb").open()


def read_json(url: str) -> dict | None:
    """A small JSON side file (sizes.json, *_stats.json), or None when it does not exist."""
    try:
        with open_url(url) as f:
            return json.load(io.TextIOWrapper(f, encoding="utf-8"))
    except (FileNotFoundError, urllib.error.HTTPError):
        return None
    except (OSError, ValueError) as exn:
        log.warning("ignoring unreadable %s: %s", url, exn)
        return None
