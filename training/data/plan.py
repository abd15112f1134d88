"""Which samples each rank and worker reads this epoch, and how many batches every rank gets.

Ranks of a data-parallel job must run the same number of steps, and a resumed run (on this or
another number of ranks) must continue exactly where the data left off. So the plan fixes,
before any shard is read:

- `batches`: the micro-batches per epoch of every rank (the same on all ranks);
- batch i of a rank comes from its worker i % num_workers (PyTorch's DataLoader takes batches from
  its workers round-robin).

Exact epochs: the samples follow the epoch's global order (order.py), which does not depend on the
world size. Optimizer step s trains on global positions [s*G, (s+1)*G) (G = the global batch);
rank r of W takes the contiguous G/W of them from s*G + r*G/W, cut into its micro-batches. So a run
that has trained `p` samples of the epoch has seen positions 0..p-1 whatever its world size, and a
run resumed on another world size takes exactly the positions not yet seen. Every listed sample
is used once except a tail smaller than one global batch (`dropped`, logged and in the metrics).
Resampled: every worker draws shards with replacement forever; `batches` is
samples_per_epoch // (batch_size * world_size * accum) * accum.
"""
from __future__ import annotations

import functools
import logging
import posixpath
import random
from dataclasses import dataclass

from .order import EpochOrder
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
    order: EpochOrder | None = None   # exact epochs
    rank: int = 0
    world_size: int = 1
    batch_size: int = 0
    sources: int = 1                  # resampled: the sources mixed

    @property
    def dropped(self) -> int:
        return self.order.dropped if self.order is not None else 0

    def worker_batches(self, worker: int, before: int | None = None) -> int:
        """How many of the first `before` batches (default: all) worker `worker` produces."""
        end = self.batches if before is None else min(before, self.batches)
        return len(range(worker, end, self.num_workers))

    def shards_side_by_side(self) -> int:
        """How many shards a worker of this rank reads at once (the most): exact epochs, the
        lanes its step's positions come from times the shards one lane's window spans
        (order.py); resampled, one shard per source."""
        if self.order is None:
            return self.sources
        accum = self.batches // self.order.steps
        first = self.rank * accum * self.batch_size
        last = first + accum * self.batch_size - 1
        lanes = last // self.order.lane_step - first // self.order.lane_step + 1
        return min(lanes, self.order.lanes) * self.order.shards_per_window()

    def positions(self, batch: int) -> range:
        """Exact epochs: the global positions (order.py) of this rank's micro-batch `batch`."""
        accum = self.batches // self.order.steps
        step, micro = divmod(batch, accum)
        start = step * self.order.global_batch + (self.rank * accum + micro) * self.batch_size
        return range(start, start + self.batch_size)


def plan_exact(sources: list[Source], *, batch_size: int, accum: int, rank: int, world_size: int,
               lanes: int, num_workers: int, seed: int, epoch: int, window: int,
               samples_per_epoch: int | None = None, sizes: ShardSizes | None = None) -> EpochPlan:
    """`lanes` (order.py) is fixed by the run's first world size and kept by its resumes."""
    urls = [url for source in sources for url in source.urls]
    global_batch = batch_size * accum * world_size
    if global_batch % lanes:
        raise DataError(f"data.train: the global batch {global_batch} does not split into "
                        f"{lanes} lanes of the epoch order")
    sizes = sizes or ShardSizes()
    order = list(urls)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    epoch_order = EpochOrder.build(order, [sizes(url) for url in order], global_batch=global_batch,
                                   lanes=lanes, window=window, tag=f"{seed}:{epoch}",
                                   max_samples=samples_per_epoch)
    if epoch_order.steps <= 0:
        raise DataError(f"data.train: {epoch_order.total} samples in {len(urls)} shards give no "
                        f"full global batch of {global_batch} ({batch_size} per rank x {accum} "
                        f"micro-batches x {world_size} ranks)")
    return EpochPlan(False, epoch_order.steps * accum, num_workers, epoch_order, rank, world_size,
                     batch_size)


def plan_resampled(sources: list[Source], *, batch_size: int, accum: int, world_size: int,
                   num_workers: int, samples_per_epoch: int | None,
                   sizes: ShardSizes | None = None) -> EpochPlan:
    if samples_per_epoch is None:
        sizes = sizes or ShardSizes()
        samples_per_epoch = sum(sizes(url) for source in sources for url in source.urls)
    steps = samples_per_epoch // (batch_size * accum * world_size)
    if steps <= 0:
        raise DataError(f"data.samples_per_epoch={samples_per_epoch} gives no global batch of "
                        f"{batch_size} x {accum} micro-batches on each of {world_size} ranks")
    return EpochPlan(True, steps * accum, num_workers, batch_size=batch_size,
                     sources=len(sources))
