"""An exact epoch's samples in one global order, the same for every world size.

    order = EpochOrder.build(shards, sizes, global_batch=64, lanes=4, window=500, tag="0:3")
    order.sequence_index(position)   # global position (0, 1, ... in training order) -> sample
    order.locate(index)              # sample index -> (shard url, member group in that shard)

The samples of the epoch are the shards (shuffled by seed and epoch) read one after the other:
sample index i is the i-th of that sequence. The sequence is cut into `lanes` equal contiguous
lanes, each shuffled within windows of `window` samples (a seeded permutation per window). One
optimizer step takes the next `global_batch / lanes` samples of every lane, lane after lane, so
global position p is sample `sequence_index(p)` and a run that has trained `p` samples of the epoch
has seen exactly positions 0..p-1, on whatever number of ranks it ran. How positions are split
among ranks and micro-batches is the plan's (plan.py); only this order defines which samples an
epoch uses.

Every listed sample is used except the tail that does not fill a last global batch (fewer than
`global_batch + lanes` samples, counted in `dropped`). A lane is contiguous, so a rank reading
the lanes its positions come from reads a contiguous part of the data (SequenceReader).
"""
from __future__ import annotations

import bisect
import functools
import logging
import random
from dataclasses import dataclass
from typing import Iterator, Optional

from .samples import SampleAccount, read_shard
from .sources import read_ahead

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)
def _window_permutation(tag: str, lane: int, start: int, size: int) -> tuple[int, ...]:
    permutation = list(range(size))
    random.Random(f"order:{tag}:{lane}:{start}").shuffle(permutation)
    return tuple(permutation)


@dataclass(frozen=True)
class EpochOrder:
    shards: tuple[str, ...]   # in reading order (shuffled by seed and epoch)
    starts: tuple[int, ...]   # sample index of each shard's first sample
    total: int                # samples listed in all shards
    lanes: int
    lane_step: int            # samples each lane gives per optimizer step
    steps: int                # optimizer steps in the epoch
    window: int               # shuffle window inside a lane (1: no shuffle)
    tag: str                  # seeds the windows' permutations

    @classmethod
    def build(cls, shards: list[str], sizes: list[int], *, global_batch: int, lanes: int,
              window: int, tag: str, max_samples: Optional[int] = None) -> "EpochOrder":
        starts, total = [], 0
        for size in sizes:
            starts.append(total)
            total += size
        usable = total if max_samples is None else min(total, max_samples)
        lane_step = global_batch // lanes
        steps = (usable // lanes) // lane_step
        return cls(tuple(shards), tuple(starts), total, lanes, lane_step, steps, max(window, 1),
                   tag)

    @property
    def global_batch(self) -> int:
        return self.lanes * self.lane_step

    @property
    def lane_length(self) -> int:
        return self.total // self.lanes

    @property
    def used(self) -> int:
        """Samples the epoch trains on."""
        return self.steps * self.global_batch

    @property
    def dropped(self) -> int:
        return self.total - self.used

    def window_start(self, index: int) -> int:
        """The sample index where the shuffle window holding sample `index` begins."""
        lane, offset = divmod(index, self.lane_length)
        return lane * self.lane_length + offset - offset % self.window

    def sequence_index(self, position: int) -> int:
        step, within = divmod(position, self.global_batch)
        lane, offset = divmod(within, self.lane_step)
        j = step * self.lane_step + offset  # position inside the lane
        start = j - j % self.window
        size = min(self.window, self.steps * self.lane_step - start)
        return lane * self.lane_length + start + _window_permutation(self.tag, lane, start,
                                                                     size)[j - start]

    def locate(self, index: int) -> tuple[str, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return self.shards[shard], index - self.starts[shard]

    def read_from(self, index: int, account: SampleAccount) -> Iterator[dict | str]:
        """Raw samples from sample `index` on, in sequence order. A sample its shard lacks (cut
        short, unreadable) is its shard's url instead, so the indices stay aligned."""
        shard = bisect.bisect_right(self.starts, index) - 1
        skip = index - self.starts[shard]
        # read_ahead: the next remote shards download while this one is read (sources.py)
        for k, url in zip(range(shard, len(self.shards)), read_ahead(self.shards[shard:])):
            listed = self.size(k)
            found = 0
            for raw in read_shard(url, account):
                if found >= listed:
                    break
                if found >= skip:
                    yield raw
                found += 1
            if found < listed and url not in account.shard_errors:
                log.warning("shard %s gave %d samples, its listing says %d", url, found, listed)
                account.shard_errors[url] += 1
            for _ in range(max(found, skip), listed):
                yield url
            skip = 0

    def shards_per_window(self) -> int:
        """The most shards one lane's shuffle window spans: its samples are asked for in a
        permuted order, so that many shards of the lane are read side by side."""
        smallest = min((self.size(k) for k in range(len(self.shards)) if self.size(k) > 0),
                       default=1)
        return 1 if self.window <= 1 else -(-(self.window - 1) // smallest) + 1

    def size(self, shard: int) -> int:
        end = self.starts[shard + 1] if shard + 1 < len(self.starts) else self.total
        return end - self.starts[shard]


class SequenceReader:
    """Raw samples by sample index, each lane read forward once.

    The indices asked for move forward window by window within each lane (the order's windows):
    samples read past on the way (other ranks' or workers') stay cached until their window is
    behind, so a window is read once however its samples are spread over batches.
    """

    def __init__(self, order: EpochOrder, account: SampleAccount):
        self.order, self.account = order, account
        self._streams: dict[int, tuple[Iterator, int]] = {}  # lane -> (reader, next index)
        self._cache: dict[int, dict[int, dict | str]] = {}   # lane -> {index: raw}
        self._window: dict[int, int] = {}                    # lane -> current window start

    def fetch(self, index: int) -> dict | str:
        lane = index // self.order.lane_length
        cache = self._cache.setdefault(lane, {})
        window = self.order.window_start(index)
        if self._window.get(lane) != window:  # samples of earlier windows are never asked again
            self._window[lane] = window
            for old in [i for i in cache if i < window]:
                del cache[old]
        if index in cache:
            return cache.pop(index)
        stream, next_index = self._streams.get(lane, (None, None))
        if stream is None or next_index > index:
            stream, next_index = self.order.read_from(window, self.account), window
        while next_index < index:
            cache[next_index] = next(stream)
            next_index += 1
        raw = next(stream)
        self._streams[lane] = (stream, index + 1)
        return raw
