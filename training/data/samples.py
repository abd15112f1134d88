"""From shard bytes to checked raw samples: tar reading, grouping by key, cheap validation, and the
count of what was skipped and why.

A raw sample stays undecoded (image bytes) until the loader needs its pixels, so skipping (resume)
and shuffling are cheap. Validation here reads only the image header, not the pixels.
"""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import PIL.Image
from webdataset.tariterators import base_plus_ext

from .sources import DataError, ShardReadError, open_url

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __index__ and the like


class CorruptDataError(DataError):
    """Too large a fraction of the samples read could not be used."""


@dataclass
class Sample:
    """One usable sample before decoding: image bytes plus every caption it carries."""
    key: str
    url: str
    image: bytes
    captions: list[str]
    label: int | None = None
    stored: dict | None = None  # its stored teacher embeddings' members (sidecar.py), if read


def read_shard(url: str, account: "SampleAccount | None" = None) -> Iterator[dict]:
    """Yield the tar members of one shard grouped by key: {"__key__", "__url__", ext: bytes}.

    A shard that cannot be opened, is cut short, or whose `pipe:` command fails ends early: that is
    logged and counted (account.shard_errors). The sample whose member was being read is dropped
    and counted as skipped ("truncated_sample"); every sample before it was complete and is
    yielded. Tar reading and grouping are written here rather than taken from webdataset because
    its tar_file_iterator hides which member failed and its group_by_keys changed behaviour
    between versions (end-of-shard markers).
    """
    try:
        stream = open_url(url)
    except (OSError, ValueError) as exn:
        _unreadable(url, exn, account)
        return
    current: dict | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                key, ext = base_plus_ext(info.name) if info.isreg() else (None, None)
                if key is None or META_NAME.match(info.name):
                    continue
                if current is not None and current["__key__"] != key:
                    yield current  # complete: the next sample's member header came
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext.lower()] = tar.extractfile(info).read()
                tar.members = []  # a stream's TarFile would otherwise keep every header
        stream.close()  # a pipe's exit status is checked here
    except (OSError, tarfile.TarError, ValueError) as exn:
        _unreadable(url, exn, account)
        if current is not None and account is not None:
            account.skip("truncated_sample", url)
        return
    finally:
        # Reached early when the reader stops mid-shard; a pipe's command then dies of SIGPIPE,
        # which is not an error.
        _close_quietly(stream)
    if current is not None:
        yield current


def _unreadable(url: str, exn: Exception, account: "SampleAccount | None") -> None:
    if isinstance(exn, ShardReadError):
        raise exn  # a read that failed for good (retries spent, missing object): one line, stop
    log.warning("unreadable shard %s: %s", url, exn)
    if account is not None:
        account.shard_errors[url] += 1


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except (OSError, ValueError):
        pass


def _captions(raw: dict) -> list[str]:
    """All captions of a sample: json "captions" when present and non-empty, else the txt."""
    if "json" in raw:
        meta = json.loads(raw["json"])
        captions = [c for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]
        if captions:
            return captions
    if "txt" in raw:
        text = raw["txt"].decode("utf-8").strip()
        if text:
            return [text]
    return []


def check_sample(raw: dict) -> Sample | str:
    """A Sample, or the reason (a short snake_case string) why it cannot be used.

    Only the image header is parsed (PIL opens lazily), so this stays cheap enough to run on
    samples that a resumed run skips.
    """
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        return "missing_image"
    try:
        captions = _captions(raw)
    except (ValueError, UnicodeDecodeError):
        return "bad_caption"
    if not captions:
        return "missing_caption"
    label = None
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            return "bad_label"
    image = raw[image_ext]
    try:
        PIL.Image.open(io.BytesIO(image))
    except (OSError, ValueError, PIL.Image.DecompressionBombError):
        return "undecodable_image"
    return Sample(raw["__key__"], raw["__url__"], image, captions, label)


def decode_image(sample: Sample) -> PIL.Image.Image:
    """The sample's pixels as RGB; raises OSError/ValueError for a truncated or broken file."""
    with PIL.Image.open(io.BytesIO(sample.image)) as image:
        return image.convert("RGB")


@dataclass
class SampleAccount:
    """What one reader (a dataloader worker) has read and skipped, and the stop rule.

    The run stops when more than `max_fraction` of the samples read were skipped, checked once
    at least `min_samples` have been read so that one bad sample early on does not stop it.
    """
    max_fraction: float = 1.0
    min_samples: int = 0
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_per_shard: Counter = field(default_factory=Counter)
    shard_errors: Counter = field(default_factory=Counter)

    def ok(self, url: str) -> None:
        self.read += 1
        if self.read == self.min_samples:  # skips before the minimum were not checked yet
            self.check(url)

    def skip(self, reason: str, url: str, already_read: bool = False) -> None:
        self.read += not already_read
        self.skipped[reason] += 1
        self.skipped_per_shard[url] += 1
        self.check(url)

    @property
    def corrupt(self) -> int:
        return sum(self.skipped.values())

    def check(self, url: str) -> None:
        if self.read < self.min_samples or self.corrupt <= self.max_fraction * self.read:
            return
        url = url if self.skipped_per_shard[url] else self.skipped_per_shard.most_common(1)[0][0]
        worst, count = self.skipped_per_shard.most_common(1)[0]
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        raise CorruptDataError(
            f"{self.corrupt} of {self.read} samples unusable ({reasons}), above "
            f"data.max_corrupt_fraction={self.max_fraction}; last in shard {url}, "
            f"most in shard {worst} ({count})")

    def snapshot(self) -> dict:
        """Plain counts for the batch bookkeeping that travels back from a worker process."""
        return {"read": self.read, "skipped": dict(self.skipped),
                "shard_errors": sum(self.shard_errors.values())}
