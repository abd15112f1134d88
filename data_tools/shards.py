"""ShardSetWriter: turn an indexed source of samples into a WebDataset shard set.

The plan is deterministic: the source enumerates its items in a stable order and item i goes to
shard i // samples_per_shard with key f"{i:09d}". Every shard is therefore an independent unit of
work: worker processes write shards in parallel, each to a hidden `.NAME.partial` file that is
renamed when complete. A shard's record (count, skips per reason, sha256) is saved under
`.progress/` just before that rename, so a rerun of an interrupted conversion keeps the finished
shards and redoes only the missing ones. Tar members carry fixed metadata (mtime 0, uid/gid 0,
sorted order) and encoders are deterministic, so the result is byte-identical to an
uninterrupted run. At the end sizes.json and manifest.json are written atomically (the shard
contract: docs/data.md).

The output may be an object store folder (`s3://bucket/prefix`, `gs://...`: a `RemotePath`): each
shard is then written to a local staging folder and uploaded whole once complete (an object is
only visible under its name after its upload finished, so no partial shard ever is), then its
progress record; resume reads the records back from the bucket. Credentials and the endpoint come
from the environment / config files (docs/data.md, "Object storage").
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import queue as queue_module
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from data_tools import __version__
from data_tools.errors import DataError, Skip
from training.data.sources import read_text
from training.files import sha256_file, write_bytes_atomic

MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
PROGRESS_DIR = ".progress"
MAX_EXAMPLES_PER_REASON = 20
KEY_DIGITS = 9
# Output errors that mean "this folder or disk cannot take the shards": a clean one-line stop.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class Source(Protocol):
    """What a converter hands the writer: a fixed, ordered list of input items.

    `sample(i)` builds item i's tar members ({extension: bytes}) or raises `Skip`; it must be
    deterministic and must not depend on which process calls it (sources are pickled into
    worker processes). Optional attributes: `pre_skipped` (Counter of items dropped while
    planning, e.g. duplicate ids) and `pre_skipped_examples` ({reason: [dict, ...]}).
    """

    def __len__(self) -> int: ...

    def sample(self, index: int) -> dict[str, bytes]: ...

    def describe(self, index: int) -> str: ...


@dataclass
class ShardRecord:
    """What one finished shard holds; the unit of resume and of manifest.json's "shards"."""

    name: str
    count: int
    sha256: str
    bytes: int
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardPlan:
    """Where each item goes; shared read-only by every worker."""

    out_dir: Path
    prefix: str
    samples_per_shard: int
    num_items: int
    fingerprint: str
    remote: RemotePath | None = None   # upload finished shards there (out_dir is then staging)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_items / self.samples_per_shard)

    def shard_name(self, shard: int) -> str:
        return f"{self.prefix}-{shard:06d}.tar"

    def items(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.num_items))

    def key(self, index: int) -> str:
        return f"{index:0{max(KEY_DIGITS, len(str(self.num_items)))}d}"


# ---------------------------------------------------------------- output locations


@dataclass(frozen=True)
class RemotePath:
    """A folder or file in object storage, by URL; joins with `/` like a Path."""

    url: str

    def __truediv__(self, name: str) -> "RemotePath":
        return RemotePath(f"{self.url.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def fs(self):
        """(fsspec filesystem, path inside it); the library's own retries apply to writes."""
        import fsspec

        return fsspec.core.url_to_fs(self.url)

    def put(self, local: Path) -> None:
        """Upload a local file under this name: one PUT (or a multipart upload), visible whole."""
        fs, path = self.fs()
        try:
            fs.put_file(str(local), path)
        except Exception as e:  # noqa: BLE001 - the storage library's own types; one line
            raise DataError(f"cannot upload {self}: {type(e).__name__}: {e}") from None


def location(text: str) -> Path | RemotePath:
    """A folder argument: a local Path, or a RemotePath for a URL (s3://bucket/prefix, gs://...)."""
    return RemotePath(text.rstrip("/")) if "://" in text else Path(text)


# ---------------------------------------------------------------- small file helpers (public)


def atomic_write_bytes(path: Path | RemotePath, data: bytes) -> None:
    """training/files.py's atomic write (an object store PUT is atomic by itself); a failure is
    the one-line output error."""
    if isinstance(path, RemotePath):
        with tempfile.TemporaryDirectory(prefix="clip-data-") as staging:
            local = write_bytes_atomic(Path(staging) / path.name, data)
            return path.put(local)
    try:
        write_bytes_atomic(path, data)
    except OSError as e:
        raise _output_error(Path(path), e) from None


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8; undecodable input bytes (lone surrogates) are written as backslash escapes."""
    atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, ensure_ascii=False) + "\n")


def ensure_writable_dir(path: Path | RemotePath) -> Path | RemotePath:
    """Create `path` if needed and prove a file can be written there, before any real work."""
    if isinstance(path, RemotePath):
        fs, probe = (path / ".write-probe").fs()
        try:
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 - the storage library's own types; one line
            raise DataError(f"output folder {path} is not writable: "
                            f"{type(e).__name__}: {e}") from None
        return path
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise DataError(f"output folder {path} is not writable: {e.strerror or e}") from None
    return path


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def plain_name(name, where: str) -> str:
    """A folder name taken from input data or an option (a split), checked to be one plain name
    (letters, digits, ".", "_", "-"; not starting with "."), so OUT/name cannot leave OUT."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise DataError(f"{where}: {name!r} is not a plain folder name (letters, digits, '.', "
                        f"'_', '-', not starting with '.'); folders outside the output folder "
                        f"are never written")
    return name


def write_sizes(out_dir: Path | RemotePath, counts: dict[str, int]) -> None:
    """sizes.json: {shard basename: sample count}, what open_clip's trainer reads."""
    atomic_write_json(out_dir / SIZES_NAME, dict(sorted(counts.items())))


def write_manifest(out_dir: Path, *, source: str, arguments: dict, records: list[ShardRecord],
                   extra: dict | None = None, plan: str | None = None,
                   pre_skipped: dict[str, int] | None = None,
                   pre_skipped_examples: dict[str, list] | None = None) -> dict:
    """manifest.json: tool version, source, arguments, counts written and skipped per reason,
    sha256 per shard. Also used by the laion converter for img2dataset's output."""
    skipped = Counter(pre_skipped or {})
    examples = {k: list(v) for k, v in (pre_skipped_examples or {}).items()}
    for record in records:
        skipped.update(record.skipped)
        for reason, items in record.skipped_examples.items():
            examples.setdefault(reason, []).extend(items)
    written = sum(r.count for r in records)
    manifest = {
        "tool": "clip-data",
        "version": __version__,
        "source": source,
        "arguments": arguments,
        "plan": plan,
        "items": written + sum(skipped.values()),
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": {k: v[:MAX_EXAMPLES_PER_REASON] for k, v in sorted(examples.items())},
        "shards": [{"name": r.name, "count": r.count, "sha256": r.sha256, "bytes": r.bytes,
                    "skipped": r.skipped} for r in records],
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


CLASSNAMES_NAME = "classnames.txt"
TEMPLATES_NAME = "zeroshot_classification_templates.txt"


def write_label_files(out_dir: Path, classnames: list[str], templates) -> None:
    """A labelled set's classnames.txt (index order) and templates (one per line, with {c}):
    the files clip_benchmark reads next to its shards."""
    for template in templates:
        if "{c}" not in template:
            raise DataError(f"zero-shot template {template!r} has no {{c}} placeholder")
    atomic_write_text(out_dir / CLASSNAMES_NAME, "".join(f"{c}\n" for c in classnames))
    atomic_write_text(out_dir / TEMPLATES_NAME, "".join(f"{t}\n" for t in templates))


def add_writer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every converter subcommand shares."""
    group = parser.add_argument_group("shard set")
    group.add_argument("--samples-per-shard", type=int, default=10000,
                       help="samples per tar file (default: %(default)s)")
    group.add_argument("--prefix", default="shard", help="shard file prefix (default: shard)")
    group.add_argument("--workers", type=int, default=1,
                       help="processes writing shards (default: %(default)s)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace a shard set written with different arguments")
    group.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar")


RUN_ONLY_ARGUMENTS = {"func", "command", "workers", "progress", "overwrite", "out"}


def content_arguments(args: argparse.Namespace) -> dict:
    """The parsed options that define a shard set's content, for its manifest and plan: what
    only changes how the run goes (workers, progress bar) is left out, paths are made absolute."""
    return {k: str(Path(v).resolve()) if isinstance(v, Path) else
            str(v) if isinstance(v, RemotePath) else v
            for k, v in sorted(vars(args).items()) if k not in RUN_ONLY_ARGUMENTS}


def writer_from_args(args: argparse.Namespace, out_dir: Path, *, source: str,
                     arguments: dict) -> "ShardSetWriter":
    return ShardSetWriter(out_dir, source=source, arguments=arguments, prefix=args.prefix,
                          samples_per_shard=args.samples_per_shard, workers=args.workers,
                          progress=args.progress, overwrite=args.overwrite)


def _output_error(path: Path, e: OSError) -> Exception:
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return DataError(f"disk full while writing {path}; finished shards are kept: free space "
                         "and rerun the same command to resume")
    if e.errno in OUTPUT_ERRNOS:
        return DataError(f"cannot write {path}: {e.strerror}")
    return e


# ---------------------------------------------------------------- one shard (runs in a worker)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Fixed metadata so that the same samples always give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(source: Source, plan: ShardPlan, shard: int, progress=None) -> ShardRecord:
    """Write shard `shard` of `plan` (hidden partial file, progress record, atomic rename).

    We write the tar with the standard library rather than webdataset's TarWriter because we
    need exact control of every header byte for byte-identical reruns.
    """
    name = plan.shard_name(shard)
    final = plan.out_dir / name
    partial = plan.out_dir / f".{name}.partial"
    skipped: Counter = Counter()
    examples: dict[str, list] = {}
    count = pending = 0
    try:
        with open(partial, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for index in plan.items(shard):
                    try:
                        members = source.sample(index)
                    except Skip as skip:
                        skipped[skip.reason] += 1
                        if len(examples.setdefault(skip.reason, [])) < MAX_EXAMPLES_PER_REASON:
                            examples[skip.reason].append(
                                {"shard": name, "item": source.describe(index),
                                 "detail": skip.detail})
                    else:
                        key = plan.key(index)
                        for ext in sorted(members):
                            add_member(tar, f"{key}.{ext}", members[ext])
                        count += 1
                    pending += 1
                    if progress is not None and pending >= 16:
                        progress(pending)
                        pending = 0
            f.flush()
            os.fsync(f.fileno())
        record = commit_shard(partial, final, plan.fingerprint, count=count,
                              skipped=dict(sorted(skipped.items())), skipped_examples=examples)
        if plan.remote is not None:   # the shard whole, then its record; the staging copy goes
            (plan.remote / name).put(final)
            record_name = f"{PROGRESS_DIR}/{name}.json"
            (plan.remote / record_name).put(plan.out_dir / record_name)
            final.unlink()
    except (OSError, DataError) as e:
        partial.unlink(missing_ok=True)
        raise (_output_error(final, e) if isinstance(e, OSError) else e) from None
    if progress is not None and pending:
        progress(pending)
    return record


def commit_shard(partial: Path, final: Path, fingerprint: str, **fields) -> ShardRecord:
    """A completely written (and fsynced) partial file becomes shard `final`: its record goes to
    `.progress/` first (the unit of resume), then the atomic rename."""
    record = ShardRecord(name=final.name, sha256=sha256_file(partial),
                         bytes=partial.stat().st_size, **fields)
    folder = final.parent / PROGRESS_DIR
    folder.mkdir(exist_ok=True)
    atomic_write_json(folder / f"{record.name}.json", {"plan": fingerprint, **asdict(record)})
    os.replace(partial, final)
    return record


def finished_records(out_dir: Path, fingerprint: str, names: list[str], *, overwrite: bool,
                     clear, remote: RemotePath | None = None) -> dict[str, ShardRecord]:
    """Shards named `names` that a previous run of the same plan completed (its manifest.json or
    `.progress/` records, in `remote` when the set is written there; the file present with the
    recorded sha256, or for an object store with the recorded size, uploads being whole).
    Records of another plan: DataError, or with `overwrite`, `clear()` and nothing is finished."""
    records = {}
    for entry in _previous_records(Path(out_dir), remote):
        if entry.pop("plan", None) != fingerprint:
            if not overwrite:
                raise DataError(f"{remote or out_dir} holds a shard set written with different "
                                "arguments; use an empty folder or pass --overwrite")
            clear()
            return {}
        records[entry["name"]] = ShardRecord(**entry)
    uploaded = remote_sizes(remote, prefix=None) if remote is not None else {}
    done = {}
    for name in names:
        record, path = records.get(name), Path(out_dir) / name
        if record and remote is not None and uploaded.get(name) == record.bytes:
            done[name] = record
        elif record and path.is_file() and path.stat().st_size == record.bytes \
                and sha256_file(path) == record.sha256:
            done[name] = record
    return done


def remote_sizes(remote: RemotePath, prefix: str | None) -> dict[str, int]:
    """{object name: bytes} of the .tar objects in `remote` (named `prefix`-* when given)."""
    fs, root = remote.fs()
    fs.invalidate_cache(root)   # listings are cached per filesystem instance
    pattern = f"{root}/{prefix}-*.tar" if prefix else f"{root}/*.tar"
    return {path.rsplit("/", 1)[-1]: info["size"] for path, info in fs.glob(pattern, detail=True).items()}


def _previous_texts(out_dir: Path, remote: RemotePath | None
                    ) -> tuple[str | None, list[tuple[Path | None, str]]]:
    """manifest.json's text (None if absent) and each progress record's (local path, text)."""
    if remote is not None:
        fs, root = (remote / PROGRESS_DIR).fs()
        fs.invalidate_cache(root)
        records = [(None, fs.cat_file(path).decode()) for path in sorted(fs.glob(f"{root}/*.json"))]
        return read_text(str(remote / MANIFEST_NAME)), records
    manifest_path = out_dir / MANIFEST_NAME
    manifest = manifest_path.read_text() if manifest_path.is_file() else None
    return manifest, [(path, path.read_text())
                      for path in sorted((out_dir / PROGRESS_DIR).glob("*.json"))]


def _previous_records(out_dir: Path, remote: RemotePath | None = None) -> list[dict]:
    entries = []
    manifest_text, progress = _previous_texts(out_dir, remote)
    if manifest_text is not None:
        try:
            manifest = json.loads(manifest_text)
            for shard in manifest.get("shards", []):
                examples = {k: [e for e in v if e.get("shard") == shard["name"]]
                            for k, v in manifest.get("skipped_examples", {}).items()}
                entries.append({"plan": manifest.get("plan"), **shard,
                                "skipped_examples": {k: v for k, v in examples.items() if v}})
        except (ValueError, KeyError, TypeError):
            entries.append({"plan": "unreadable manifest"})
    for path, text in progress:
        try:
            entries.append(json.loads(text))
        except ValueError:
            if path is not None:
                path.unlink()  # a torn record: that shard is simply redone
    return entries


_WORKER: dict = {}


def _init_worker(source, plan, progress_queue) -> None:
    _WORKER.update(source=source, plan=plan, queue=progress_queue)


def _write_shard_in_worker(shard: int) -> ShardRecord:
    return write_shard(_WORKER["source"], _WORKER["plan"], shard, _WORKER["queue"].put)


# ---------------------------------------------------------------- the writer


class ShardSetWriter:
    """Writes one shard set: `{prefix}-{000000..}.tar` + sizes.json + manifest.json in `out_dir`
    (a folder, or a RemotePath: shards are then staged in a local temporary folder, uploaded
    whole and deleted one by one).

    `arguments` are the options that define the content (recorded in the manifest and hashed
    into the plan fingerprint: a rerun with other arguments is refused unless `overwrite`).
    """

    def __init__(self, out_dir: Path | RemotePath, *, source: str, arguments: dict,
                 prefix: str = "shard",
                 samples_per_shard: int = 10000, workers: int = 1, progress: bool = True,
                 overwrite: bool = False):
        if samples_per_shard < 1:
            raise DataError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
        if workers < 1:
            raise DataError(f"--workers must be at least 1, got {workers}")
        if not prefix or "." in prefix or "/" in prefix:
            raise DataError(f"--prefix must be non-empty without '.' or '/', got {prefix!r}")
        self.remote = out_dir if isinstance(out_dir, RemotePath) else None
        self.target = out_dir if self.remote else Path(out_dir)
        self.out_dir = self.target   # where shards are written: a staging folder when remote
        self.source_name = source
        self.arguments = arguments
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.workers = workers
        self.progress = progress
        self.overwrite = overwrite

    def plan(self, num_items: int) -> ShardPlan:
        identity = {"version": __version__, "source": self.source_name,
                    "arguments": self.arguments, "prefix": self.prefix,
                    "samples_per_shard": self.samples_per_shard, "items": num_items}
        fingerprint = hashlib.sha256(
            json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return ShardPlan(self.out_dir, self.prefix, self.samples_per_shard, num_items, fingerprint,
                         self.remote)

    def write(self, source: Source, extra_manifest: dict | None = None) -> dict:
        """Write every shard not already finished; return the manifest."""
        ensure_writable_dir(self.target)
        if self.remote is None:
            return self._write(source, extra_manifest)
        with tempfile.TemporaryDirectory(prefix="clip-data-staging-") as staging:
            self.out_dir = Path(staging)
            try:
                return self._write(source, extra_manifest)
            finally:
                self.out_dir = self.target

    def _write(self, source: Source, extra_manifest: dict | None) -> dict:
        plan = self.plan(len(source))
        done = self._finished_shards(plan)
        todo = [s for s in range(plan.num_shards) if s not in done]
        for stale in self.out_dir.glob(f".{self.prefix}-*.tar.partial"):
            stale.unlink()
        with tqdm(total=plan.num_items, unit="sample", smoothing=0.1,
                  initial=sum(len(plan.items(s)) for s in done), disable=not self.progress,
                  desc=f"{self.source_name} -> {self.target.name}", dynamic_ncols=True) as bar:
            if self.workers == 1 or len(todo) <= 1:
                for shard in todo:
                    done[shard] = write_shard(source, plan, shard, bar.update)
            else:
                done.update(self._write_in_pool(source, plan, todo, bar))
        records = [done[s] for s in range(plan.num_shards)]
        write_sizes(self.target, {r.name: r.count for r in records})
        manifest = write_manifest(
            self.target, source=self.source_name, arguments=self.arguments, records=records,
            plan=plan.fingerprint, extra=extra_manifest,
            pre_skipped=getattr(source, "pre_skipped", None),
            pre_skipped_examples=getattr(source, "pre_skipped_examples", None))
        shutil.rmtree(self.out_dir / PROGRESS_DIR, ignore_errors=True)
        if self.remote is not None:
            self._remove_remote(self.remote / PROGRESS_DIR, recursive=True)
        return manifest

    def _write_in_pool(self, source, plan, todo, bar) -> dict[int, ShardRecord]:
        """Shards in parallel processes; workers report finished samples through a queue so
        that the progress bar moves per sample, not per shard."""
        ctx = multiprocessing.get_context("spawn")  # safe next to threads (torch, tqdm)
        progress_queue = ctx.Queue()
        results = {}
        with ctx.Pool(min(self.workers, len(todo)), initializer=_init_worker,
                      initargs=(source, plan, progress_queue)) as pool:
            pending = {s: pool.apply_async(_write_shard_in_worker, (s,)) for s in todo}
            while pending:
                try:
                    bar.update(progress_queue.get(timeout=0.2))
                except queue_module.Empty:
                    pass
                for shard in [s for s, r in pending.items() if r.ready()]:
                    results[shard] = pending.pop(shard).get()  # re-raises a worker's DataError
            while True:
                try:
                    bar.update(progress_queue.get_nowait())
                except queue_module.Empty:
                    break
        return results

    def _finished_shards(self, plan: ShardPlan) -> dict[int, ShardRecord]:
        """Shards of this same plan that a previous run completed (manifest or .progress/)."""
        names = {plan.shard_name(shard): shard for shard in range(plan.num_shards)}
        done = finished_records(self.out_dir, plan.fingerprint, list(names),
                                overwrite=self.overwrite, clear=self._clear, remote=self.remote)
        return {names[name]: record for name, record in done.items()}

    def _remote_sizes(self) -> dict[str, int]:
        return remote_sizes(self.remote, self.prefix)

    def _remove_remote(self, target: RemotePath, recursive: bool = False) -> None:
        fs, path = target.fs()
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    def _clear(self) -> None:
        if self.remote is not None:
            for name in self._remote_sizes():
                self._remove_remote(self.remote / name)
            for name in (MANIFEST_NAME, SIZES_NAME):
                self._remove_remote(self.remote / name)
            self._remove_remote(self.remote / PROGRESS_DIR, recursive=True)
        for path in self.out_dir.glob(f"{self.prefix}-*.tar"):
            path.unlink()
        for name in (MANIFEST_NAME, SIZES_NAME):
            (self.out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.out_dir / PROGRESS_DIR, ignore_errors=True)
