"""Where training shards come from: source specs, and opening a shard URL for reading.

A source spec is what users write in `data.train`: brace-expanded shard lists (local paths,
`pipe:` commands, fsspec URLs), several joined with `::`, e.g.
`/data/cc3m/shard-{000000..000331}.tar::s3://b/laion-{0000..9999}.tar`.

Everything that is not a local file is read through one retrying reader: a read that gets no byte
for `timeout_s` (a stalled `pipe:` command, a silent server), a server error or a dropped
connection is retried `retries` times with exponential backoff, resuming at the byte where it
stopped, and each retry is counted (`read_retries()`, in the loader's stats). A missing object or
a refused access is permanent: no retry. Either way the reader then raises `ShardReadError`, one
line naming the shard. `read_ahead` downloads the next remote shards of a worker to local temporary
files while the current one is parsed. Credentials and the S3 endpoint come from the environment
and the usual config files (AWS_ACCESS_KEY_ID / AWS_PROFILE, ~/.aws/config, AWS_ENDPOINT_URL),
through fsspec's s3fs / gcsfs, never from our configs; nothing here logs them.
"""
from __future__ import annotations

import collections
import glob
import io
import json
import logging
import os
import select
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, Sequence

import braceexpand
import fsspec

from .config import SOURCE_SEPARATOR

log = logging.getLogger(__name__)



class DataError(ValueError):
    """An expected problem with the data or its configuration; the message is one line naming the
    file, key or value, so the trainer prints it without a traceback."""


class ShardReadError(DataError):
    """A shard or side file that could not be read: missing, refused, or still failing after the
    retries. `missing` is True for an object that does not exist."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.message, self.missing = message, missing

    def __str__(self) -> str:  # fixed: tar readers append to args[0] of what passes through them
        return self.message


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
    sources = [Source(part, expand_part(part), w) for part, w in zip(parts, weights)]
    urls = [url for source in sources for url in source.urls]
    check_local_shards_exist(urls)
    check_url_schemes(urls)
    return sources


def expand_part(part: str) -> tuple[str, ...]:
    """One source's shards: a local folder's .tar files, a local glob (`*`, `?`, `[`) sorted, or
    a brace pattern / URL (`shard-{000000..000099}.tar`, `s3://b/p/{0..9}.tar`, `pipe:...`)."""
    if is_local(part) and os.path.isdir(part):
        shards = shard_files(part)
        if not shards:
            raise DataError(f"data.train: folder {part} holds no .tar shards")
        return tuple(shards)
    if is_local(part) and any(c in part for c in "*?["):
        shards = sorted(path for path in glob.glob(part) if os.path.isfile(path))
        if not shards:
            raise DataError(f"data.train: no shard matches {part}")
        return tuple(shards)
    return tuple(braceexpand.braceexpand(part))


def shard_files(folder: str | os.PathLike) -> list[str]:
    """The folder's .tar shards, each file once: clip_benchmark's 0.tar, 1.tar, ... links (which
    `clip-data folder` writes) name shards that are already in the folder."""
    chosen: dict[str, str] = {}
    paths = sorted(glob.glob(os.path.join(glob.escape(str(folder)), "*.tar")),
                   key=lambda p: (os.path.islink(p), os.path.basename(p)))
    for path in paths:
        if os.path.isfile(path):
            chosen.setdefault(os.path.realpath(path), path)
    return sorted(chosen.values())


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


# ---------------------------------------------------------------- how remote reads behave


@dataclass(frozen=True)
class ReadPolicy:
    """Timeouts, retries and read-ahead of non-local reads (data.read_* keys; defaults elsewhere)."""
    timeout_s: float = 60.0   # no byte for this long: the attempt failed
    retries: int = 3          # attempts after the first, per failing read
    backoff_s: float = 1.0    # wait before retry k (0-based): backoff_s * 2**k
    read_ahead: int = 1       # remote shards a reader downloads ahead of the one it parses

    @classmethod
    def from_config(cls, cfg) -> "ReadPolicy":
        return cls(cfg.read_timeout_s, cfg.read_retries, cfg.retry_backoff_s, cfg.read_ahead)


_policy = ReadPolicy()
_retry_count = 0   # per process: each loader worker reports its own
_lock = threading.Lock()


def configure_reads(policy: ReadPolicy) -> None:
    """Set this process's read policy and zero its retry count (a loader worker calls it first)."""
    global _policy, _retry_count
    with _lock:
        _policy, _retry_count = policy, 0


def read_retries() -> int:
    """Retries of failed reads in this process since configure_reads."""
    return _retry_count


def _count_retry() -> None:
    global _retry_count
    with _lock:
        _retry_count += 1


def _filesystem(url: str, policy: ReadPolicy):
    """The fsspec filesystem of `url`, with its own retries off (ours retry, and count) and our
    timeout. s3fs takes credentials and the endpoint (AWS_ENDPOINT_URL) from botocore's usual
    chain: environment, ~/.aws/config and credentials files, instance roles."""
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol not in ("s3", "s3a"):
        return fsspec.filesystem(protocol)  # gcsfs: its own defaults under our retries
    fs = fsspec.filesystem(protocol, config_kwargs={
        "connect_timeout": policy.timeout_s, "read_timeout": policy.timeout_s,
        "retries": {"total_max_attempts": 1, "mode": "standard"}})
    fs.retries = 1  # s3fs's own retry loop (an attribute, not an argument); instances are per options
    return fs


def _open_once(url: str, offset: int, policy: ReadPolicy) -> IO[bytes]:
    """One attempt to open `url` positioned at byte `offset`."""
    if url.startswith("pipe:"):
        stream = _PipeStream(url[len("pipe:"):], policy.timeout_s)
        _skip(stream, offset)   # a command cannot seek: run it again and drop what was read
        return stream
    if url.startswith(("http://", "https://")):
        # The standard library's streaming reader: fsspec's HTTP filesystem would fetch extra
        # HEAD/range requests the servers of small deployments do not all answer.
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        stream = urllib.request.urlopen(request, timeout=policy.timeout_s)
        if offset and stream.status != 206:
            _skip(stream, offset)
        return stream
    stream = _filesystem(url, policy).open(url, "rb")
    if offset:
        stream.seek(offset)
    return stream


def _skip(stream: IO[bytes], count: int) -> None:
    while count > 0:
        data = stream.read(min(count, 1 << 20))
        if not data:
            raise EOFError("stream ended before the resume offset")
        count -= len(data)


def _permanent(exn: BaseException) -> str | None:
    """Why retrying cannot help (missing object, refused access), or None."""
    if isinstance(exn, FileNotFoundError):
        return "not found"
    if isinstance(exn, PermissionError):
        return "access denied"
    if isinstance(exn, urllib.error.HTTPError) and 400 <= exn.code < 500 and exn.code not in (408, 429):
        return "not found" if exn.code == 404 else f"HTTP {exn.code} {exn.reason}"
    return None


def _describe(exn: BaseException) -> str:
    text = str(exn).strip().splitlines()
    return f"{type(exn).__name__}: {text[0][:200]}" if text else type(exn).__name__


class _RetryingReader(io.RawIOBase):
    """A non-local URL as one byte stream; a failed open or read is retried with backoff from the
    byte where it stopped (see the module docstring)."""

    def __init__(self, url: str, policy: ReadPolicy):
        super().__init__()
        self.url, self.policy, self.position = url, policy, 0
        self.stream: IO[bytes] | None = None
        self._attempt(lambda: None)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        def read():
            data = self.stream.read(len(buffer))
            buffer[:len(data)] = data
            return len(data)
        count = self._attempt(read)
        self.position += count
        return count

    def _attempt(self, action):
        for attempt in range(self.policy.retries + 1):
            try:
                if self.stream is None:
                    self.stream = _open_once(self.url, self.position, self.policy)
                return action()
            except Exception as exn:  # noqa: BLE001 - every library raises its own; all retried
                self._drop_stream()
                why = _permanent(exn)
                if why is not None:
                    raise ShardReadError(f"{self.url}: {why}", missing=why == "not found") from None
                if attempt == self.policy.retries:
                    raise ShardReadError(
                        f"{self.url}: {_describe(exn)} (gave up after {self.policy.retries} retries; "
                        f"read timeout {self.policy.timeout_s:g} s)") from None
                log.warning("retrying %s at byte %d: %s", self.url, self.position, _describe(exn))
                _count_retry()
                time.sleep(self.policy.backoff_s * 2 ** attempt)

    def _drop_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - the stream already failed
                pass

    def close(self) -> None:
        self._drop_stream()
        super().close()


class _PipeStream(io.RawIOBase):
    """A shell command's stdout with a timeout on every read. The exit status is checked at end
    of stream (a failed command is an error); closing early kills the command (not an error)."""

    def __init__(self, command: str, timeout_s: float):
        super().__init__()
        self.command, self.timeout_s = command, timeout_s
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=0,
                                        start_new_session=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        fd = self.process.stdout.fileno()
        if not select.select([fd], [], [], self.timeout_s)[0]:
            raise TimeoutError(f"command gave no data for {self.timeout_s:g} s")
        data = os.read(fd, len(buffer))
        buffer[:len(data)] = data
        if not data:
            try:
                status = self.process.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise TimeoutError(
                    f"command did not exit {self.timeout_s:g} s after its output ended") from None
            if status != 0:
                raise OSError(f"command exited with status {status}")
        return len(data)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 9)   # its whole process group: `a | b` pipelines too
            except ProcessLookupError:
                pass
        self.process.wait()
        self.process.stdout.close()
        super().close()


def open_url(url: str) -> IO[bytes]:
    """Open a shard or a side file for streaming reads.

    A plain path is a local file. Anything else (`pipe:CMD`, http(s), any fsspec URL: s3://, gs://,
    file://, ...) goes through the retrying reader of this process's ReadPolicy, or is the local
    copy that `read_ahead` downloaded. Errors: ShardReadError (one line) once retries are spent."""
    if is_local(url):
        return open(url, "rb")
    prefetched = _take_prefetched(url)
    if prefetched is not None:
        return prefetched.result()
    return io.BufferedReader(_RetryingReader(url, _policy), buffer_size=1 << 20)


def read_text(url: str) -> str | None:
    """A small UTF-8 side file (sizes.json, classnames.txt, ...) local or remote, or None when it
    does not exist. Other failures are ShardReadError / OSError as for shards."""
    try:
        with open_url(url) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        return None
    except ShardReadError as exn:
        if exn.missing:
            return None
        raise


def read_json(url: str) -> dict | None:
    """A small JSON side file (sizes.json, *_stats.json), or None when it does not exist."""
    try:
        text = read_text(url)
        return None if text is None else json.loads(text)
    except ValueError as exn:   # not JSON, not UTF-8 (a failed read is a ShardReadError: raised)
        if isinstance(exn, ShardReadError):
            raise
        log.warning("ignoring unreadable %s: %s", url, exn)
        return None


def list_tars(folder_url: str) -> list[str]:
    """The .tar objects directly under a remote folder (s3://bucket/prefix), sorted, as URLs."""
    try:
        fs, root = fsspec.core.url_to_fs(folder_url.rstrip("/"))
        fs.invalidate_cache(root)   # listings are cached per filesystem instance
        return sorted(fs.unstrip_protocol(path) for path in fs.glob(f"{root}/*.tar"))
    except Exception as exn:  # noqa: BLE001 - the storage library's own types; one line
        raise ShardReadError(f"{folder_url}: cannot list shards: {_describe(exn)}") from None


# ---------------------------------------------------------------- read-ahead

_prefetched: dict[str, collections.deque] = collections.defaultdict(collections.deque)


def _take_prefetched(url: str) -> Future | None:
    with _lock:
        queue = _prefetched.get(url)
        return queue.popleft() if queue else None


def _download(url: str, policy: ReadPolicy) -> IO[bytes]:
    """`url` copied to an anonymous local temporary file (gone when closed), positioned at 0."""
    local = tempfile.TemporaryFile()
    try:
        with io.BufferedReader(_RetryingReader(url, policy), buffer_size=1 << 20) as remote:
            while block := remote.read(1 << 22):
                local.write(block)
    except BaseException:
        local.close()
        raise
    local.seek(0)
    return local


def read_ahead(urls: Iterable[str], depth: int | None = None) -> Iterator[str]:
    """Yield `urls` in order; while the caller reads one, the next `depth` non-local ones are being
    downloaded in background threads (open_url then returns the local copy). Local paths are not
    copied. Unread copies are deleted when the generator is closed."""
    depth = _policy.read_ahead if depth is None else depth
    if depth <= 0:
        yield from urls
        return
    pool = ThreadPoolExecutor(depth, thread_name_prefix="read-ahead")
    window: collections.deque = collections.deque()
    urls = iter(urls)
    policy = _policy

    def fill() -> None:
        while len(window) < depth + 1:
            url = next(urls, None)
            if url is None:
                return
            window.append((url, None if is_local(url) else pool.submit(_download, url, policy)))

    current = None
    try:
        fill()
        while window:
            url, current = window.popleft()
            if current is not None:
                with _lock:
                    _prefetched[url].append(current)
            fill()
            yield url
            _forget(url, current)   # the caller did not open it (e.g. it stopped early)
            current = None
    finally:
        if current is not None:
            _forget(url, current)
        for _, future in window:
            _discard(future)
        pool.shutdown(wait=False, cancel_futures=True)


def _forget(url: str, future: Future | None) -> None:
    with _lock:
        if future is not None and future in _prefetched.get(url, ()):
            _prefetched[url].remove(future)
            _discard(future)


def _discard(future: Future | None) -> None:
    if future is None:
        return
    future.add_done_callback(
        lambda f: not f.cancelled() and f.exception() is None and f.result().close())
