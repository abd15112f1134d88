"""Atomic file writes: the one way this project writes a file another process may read.

A reader (a resuming rank, `clip-status`, the next stage, a user's `cat`) sees the old file or
the new one, never half of one: the content goes to a hidden temporary sibling, is flushed to disk
(fsync) and renamed over the target (os.replace is atomic on POSIX file systems). The file gets
the mode any new file gets (0666 minus the umask), also where the writer (safetensors) made it
0600: on a shared file system colleagues read exports and inherited weights. Also the one file
digest (`sha256_file`: manifests, teacher weights).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` fills a temporary sibling of `path`, which is then fsynced and renamed over
    `path`. A failed write leaves no temporary file behind; the error propagates."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask. Read from /proc where there is one: the portable way (set it, then set
    it back) changes it for a moment under the other threads (read-ahead, loader workers' files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """UTF-8; undecodable input (lone surrogates) is written as backslash escapes."""
    return write_bytes_atomic(path, text.encode("utf-8", errors="backslashreplace"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


# State-dict (weights) files this project reads: safetensors, or torch's (loaded weights_only).
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
