"""Which worker reads which shards this epoch, and how many batches every rank gets.

Ranks of a data-parallel job must run the same number of steps, and a resumed run must be able to
say which worker produced which batch. So the plan fixes, before any shard is read:

- `batches`: the batches per epoch of every rank (the same on all ranks);
- batch i of a rank comes from its worker i % num_workers (PyTorch's DataLoader takes batches from
  its workers round-robin), so worker w yields exactly len(range(w, batches, num_workers)).

Exact epochs: the shard list is shuffled by (seed, epoch), rank r takes shards r::world_size and
its worker w takes every num_workers-th of those. No two ranks or workers read the same shard.
`batches` is the largest count that every worker of every rank can fill whatever the shuffle (its
number of shards times the smallest shard sizes), so it is the same in every epoch; the samples
beyond it (the last partial batch of each worker, plus the size difference between shards) are not
read this epoch, and `dropped` counts them.
Resampled: every worker draws shards with replacement forever; `batches` is
samples_per_epoch // (batch_size * world_size).
"""
from __future__ import annotations

import functools
import logging
import posixpath
import random
from dataclasses import dataclass, field

from .samples import read_shard
from .sources import DataError, Source, read_json

log = logging.getLogger(__name__)


class ShardSizes:
    """Number of samples per shard, looked up the cheapest way available.

    In order: `sizes.json` in the shard's folder (data_tools writes it), img2dataset's
    `NNNNN_stats.json` ("successes"), and last, reading the shard and counting its keys.
    Side files are read once per folder and cached.
    """

    def __init__(self):
        self._folder_sizes: dict[str, dict] = {}
        self._checked_folders: set[str] = set()

    def __call__(self, url: str) -> int:
        if url.startswith("pipe:"):
            return self._count(url)
        folder, name = posixpath.split(url)
        sizes = self._sizes_json(folder)
        if name in sizes:
            listed = self._count_value(sizes[name], posixpath.join(folder, "sizes.json"), name)
            if folder not in self._checked_folders:
                self._checked_folders.add(folder)
                self._check_listing(url, listed)
            return listed
        stats_url = posixpath.join(folder, name.rsplit(".", 1)[0] + "_stats.json")
        stats = read_json(stats_url)
        if stats is not None and "successes" in stats:
            return self._count_value(stats["successes"], stats_url, "successes")
        return self._count(url)

    def _sizes_json(self, folder: str) -> dict:
        if folder not in self._folder_sizes:
            self._folder_sizes[folder] = read_json(posixpath.join(folder, "sizes.json")) or {}
        return self._folder_sizes[folder]

    @staticmethod
    def _count_value(value, path: str, key: str) -> int:
        """A sample count from a listing, or a one-line DataError naming the file, key, value."""
        if isinstance(value, str) and value.strip().isdigit():  # open_clip_train: int(value)
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"{path}: {key!r} must be a sample count (an integer >= 0), got "
                            f"{value!r}; rebuild it with clip-data verify")
        return value

    @staticmethod
    def _check_listing(url: str, listed: int) -> None:
        """A sizes.json that lists too few samples makes every epoch silently shorter than the
        data. The first local shard of each folder is read once and its samples counted; a
        difference can also be corrupt samples, which verify leaves out, hence a warning."""
        if "://" in url:
            return
        keys = ShardSizes._samples_in(url)
        if keys > listed:
            log.warning("%s holds %d samples, its sizes.json lists %d: unless the difference is "
                        "corrupt samples, every epoch is shorter than the data; `clip-data verify "
                        "%s` rebuilds sizes.json", url, keys, listed, posixpath.dirname(url))

    @staticmethod
    @functools.lru_cache(maxsize=None)  # warn once per shard
    def _count(url: str) -> int:
        log.warning("no sizes.json or *_stats.json for %s: counting its samples", url)
        return ShardSizes._samples_in(url)

    @staticmethod
    @functools.lru_cache(maxsize=None)  # the trainer plans every epoch: count each shard once
    def _samples_in(url: str) -> int:
        return sum(1 for _ in read_shard(url))


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch (see the module docstring)."""
    resampled: bool
    batches: int
    num_workers: int
    worker_shards: tuple[tuple[str, ...], ...] = ()   # exact epochs only, one tuple per worker
    dropped: int = 0                                   # exact epochs: samples no rank reads
    shard_sizes: dict = field(default_factory=dict)    # exact epochs: listed samples per shard

    def worker_batches(self, worker: int, before: int | None = None) -> int:
        """How many of the first `before` batches (default: all) worker `worker` produces."""
        end = self.batches if before is None else min(before, self.batches)
        return len(range(worker, end, self.num_workers))


def plan_exact(sources: list[Source], *, batch_size: int, rank: int, world_size: int,
               num_workers: int, seed: int, epoch: int, samples_per_epoch: int | None = None,
               sizes: ShardSizes | None = None) -> EpochPlan:
    urls = [url for source in sources for url in source.urls]
    readers = world_size * num_workers
    if len(urls) < readers:
        raise DataError(
            f"data.train: exact epochs need at least world_size x workers = {world_size} x {num_workers} "
            f"= {readers} shards, found {len(urls)} in {sources[0].spec!r}; use fewer workers, "
            f"more shards, or data.resampled=true")
    sizes = sizes or ShardSizes()
    shard_sizes = {url: sizes(url) for url in urls}
    order = list(urls)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)

    def shards_of(r: int, w: int) -> tuple[str, ...]:
        return tuple(order[r::world_size][w::num_workers])

    # Reader (r, w) gets a fixed NUMBER of shards whatever the shuffle; counting each as one of the
    # smallest shards gives a sample bound, hence a batch count, that is the same every epoch.
    ascending = sorted(shard_sizes.values())
    # Worker w can fill n batches when len(range(w, n, W)) <= capacity, i.e. n <= capacity*W + w.
    batches = min(sum(ascending[:len(shards_of(r, w))]) // batch_size * num_workers + w
                  for r in range(world_size) for w in range(num_workers))
    if samples_per_epoch is not None:
        batches = min(batches, samples_per_epoch // (batch_size * world_size))
    if batches <= 0:
        raise DataError(f"data.train: {sum(shard_sizes.values())} samples in {len(urls)} shards give no "
                        f"full batch of {batch_size} per rank and worker")
    dropped = sum(shard_sizes.values()) - batches * batch_size * world_size
    return EpochPlan(False, batches, num_workers,
                     tuple(shards_of(rank, w) for w in range(num_workers)), dropped, shard_sizes)


def plan_resampled(sources: list[Source], *, batch_size: int, world_size: int, num_workers: int,
                   samples_per_epoch: int | None, sizes: ShardSizes | None = None) -> EpochPlan:
    if samples_per_epoch is None:
        sizes = sizes or ShardSizes()
        samples_per_epoch = sum(sizes(url) for source in sources for url in source.urls)
    batches = samples_per_epoch // (batch_size * world_size)
    if batches <= 0:
        raise DataError(f"data.samples_per_epoch={samples_per_epoch} gives no batch of {batch_size} "
                        f"on each of {world_size} ranks")
    return EpochPlan(True, batches, num_workers)
