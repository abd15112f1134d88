"""The training loader: batches of paired views and tokens, planned so that every rank runs the same
number of steps and a resumed run, on this or another number of ranks, continues exactly where
the data left off.

Exact epochs, per dataloader worker:

    this rank's micro-batch i (plan.py) -> its global positions -> the samples there (order.py:
    the epoch's global order, each lane's shards read forward once) -> cheap checks (skip + count)
    -> decode, caption, paired crop (one RNG per global position) -> batch -> tokenize

A sample that cannot be used is counted by reason and its place in the batch taken by a usable
sample of the same batch (counted as repeated); a batch with no usable sample is a one-line
DataError, so no pass over the data is repeated and nothing waits forever.
Resampled: shards drawn with replacement per (seed, epoch, stream, rank, worker) -> checks ->
seeded shuffle buffer -> drop the batches a resumed run already trained on -> decode -> batch.

Everything random is seeded by the seed, the epoch and the sample's position, never by process
state, so (seed, epoch, skip_batches) fixes the stream.
"""
from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from .config import DataConfig
from .order import SequenceReader
from .plan import EpochPlan, plan_exact, plan_resampled
from .samples import CorruptDataError, Sample, SampleAccount, check_sample, decode_image, read_shard
from .sidecar import EmbeddingSets, SidecarJoin, pick
from .sources import (DataError, ReadPolicy, Source, configure_reads, parse_sources, read_ahead,
                      read_retries)
from .views import PairedViews, ViewSpec

log = logging.getLogger(__name__)

# A source that yields nothing for this many shard draws in a row is treated as unreadable.
MAX_EMPTY_DRAWS = 20


# Batch keys that may be the very same object as another key's value: (key, same as). A worker
# leaves such a key out of its batch when it would equal the other one; TrainLoader puts it back.
ALIASED_KEYS = (("teacher_image", "image"), ("teacher_text", "text"),
                ("teacher_text_length", "text_length"))


class _TrainStream(IterableDataset):
    """One rank's batches for one epoch; each dataloader worker produces its share (plan.py)."""

    def __init__(self, cfg: DataConfig, sources: list[Source], plan: EpochPlan, views: PairedViews,
                 tokenizer: Callable, teacher_tokenizer: Callable | None, *, seed: int, rank: int,
                 epoch: int, skip_batches: int, stream: str = "",
                 embeddings: EmbeddingSets | None = None):
        self.cfg, self.sources, self.plan, self.views = cfg, sources, plan, views
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer
        self.seed, self.rank, self.epoch, self.skip_batches = seed, rank, epoch, skip_batches
        self.stream = stream  # resampled: seeds the draws (a new world size draws anew)
        self.embeddings = embeddings
        self._join = None  # per worker: the sidecar shards being read (SidecarJoin)
        self._repeated, self._reserve = 0, []

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        # DataLoader asks its worker 0 first. Batch i of the epoch belongs to plan worker
        # i % num_workers, so a loader resuming at batch k lets its worker d play plan worker
        # (k + d) % num_workers: the round-robin then continues exactly where the first run stopped.
        worker = ((info.id if info is not None else 0) + self.skip_batches) % self.plan.num_workers
        configure_reads(ReadPolicy.from_config(self.cfg))  # this process's timeouts; retries from 0
        try:
            yield from self._batches(worker)
        except DataError as exn:
            # Raised here it would reach the trainer wrapped in the worker's traceback; the loader
            # re-raises it in the main process with its one-line message.
            yield {"__error__": (type(exn).__name__, str(exn))}

    def _batches(self, worker: int) -> Iterator[dict]:
        cfg, plan = self.cfg, self.plan
        account = SampleAccount(cfg.max_corrupt_fraction, cfg.corrupt_min_samples)
        self._repeated, self._reserve = 0, []
        if plan.worker_batches(worker, before=self.skip_batches) >= plan.worker_batches(worker):
            return
        if plan.resampled:
            yield from self._resampled_batches(worker, account)
            return
        reader = SequenceReader(plan.order, account)
        first = self.skip_batches + (worker - self.skip_batches) % plan.num_workers
        for index in range(first, plan.batches, plan.num_workers):
            yield self._exact_batch(index, reader, account, worker)

    def _exact_batch(self, index: int, reader: SequenceReader, account: SampleAccount,
                     worker: int) -> dict:
        """This rank's micro-batch `index`: the samples at its global positions (plan.py), each
        prepared with its own seeded RNG. An unusable sample is counted and its place taken by
        a usable one of the same batch (or, when it has none, of this worker's previous batch;
        counted as repeated): batches keep their size. No usable sample yet: one-line DataError."""
        order, items, urls = self.plan.order, [], []
        for position in self.plan.positions(index):
            raw = reader.fetch(order.sequence_index(position))
            if isinstance(raw, str):  # its shard lacked it (order.read_from)
                url, sample = raw, "missing_from_shard"
            else:
                url, sample = raw["__url__"], check_sample(raw)
            urls.append(url)
            if isinstance(sample, str):  # the reason it cannot be used
                account.skip(sample, url)
                items.append(None)
                continue
            account.ok(url)
            rng = random.Random(f"sample:{self.seed}:{self.epoch}:{position}")
            items.append(self._prepare(self._join_stored(sample), rng, account))
        usable = [item for item in items if item is not None] or self._reserve
        if not usable:
            raise DataError(f"data.train: no usable sample in batch {index} of rank {self.rank} "
                            f"(epoch {self.epoch}; samples from {sorted(set(urls))[0]}): "
                            f"{dict(account.skipped)}")
        self._reserve = usable  # stand-ins for a later batch with none (a shard cut short)
        self._repeated += sum(item is None for item in items)
        batch = self._collate([item if item is not None else usable[k % len(usable)]
                               for k, item in enumerate(items)])
        batch["__worker__"] = worker
        batch["__account__"] = dict(account.snapshot(), repeated=self._repeated,
                                    read_retries=read_retries())
        return batch

    def _resampled_batches(self, worker: int, account: SampleAccount) -> Iterator[dict]:
        cfg, plan = self.cfg, self.plan
        tag = f"{self.seed}:{self.epoch}:{self.stream}{self.rank}:{worker}"
        quota = plan.worker_batches(worker)
        skip = plan.worker_batches(worker, before=self.skip_batches)
        samples = self._shuffled(self._checked(self._resampled(tag, account), account), tag)
        positioned = itertools.islice(enumerate(samples), skip * cfg.batch_size, None)
        delivered, pending = skip, []
        for index, sample in positioned:
            item = self._prepare(sample, random.Random(f"sample:{tag}:{index}"), account)
            if item is None:
                continue
            pending.append(item)
            if len(pending) == cfg.batch_size:
                batch = self._collate(pending)
                batch["__worker__"] = worker
                batch["__account__"] = dict(account.snapshot(), repeated=0,
                                            read_retries=read_retries())
                yield batch
                delivered, pending = delivered + 1, []
                if delivered == quota:
                    return

    def _shuffled(self, samples: Iterator[Sample], tag: str) -> Iterator[Sample]:
        """webdataset's shuffle buffer, driven by a seeded RNG."""
        size = self.cfg.shuffle_buffer
        return _shuffle(samples, size, size, rng=random.Random(f"shuffle:{tag}")) if size > 1 else samples

    def _resampled(self, tag: str, account: SampleAccount) -> Iterator[dict]:
        """Samples mixed across sources by weight: each sample's source drawn by a seeded RNG."""
        streams = [self._draw_shards(source, f"{tag}:{i}", account) for i, source in enumerate(self.sources)]
        choose = random.Random(f"mix:{tag}")
        weights = [source.weight for source in self.sources]
        indices = range(len(streams))
        while True:
            yield next(streams[choose.choices(indices, weights)[0]])

    @staticmethod
    def _draw_shards(source: Source, tag: str, account: SampleAccount) -> Iterator[dict]:
        draw = random.Random(f"shards:{tag}")
        empty_draws = 0
        for url in read_ahead(iter(lambda: draw.choice(source.urls), None)):
            found = 0
            for raw in read_shard(url, account):
                found += 1
                yield raw
            empty_draws = 0 if found else empty_draws + 1
            if empty_draws >= MAX_EMPTY_DRAWS:
                raise DataError(f"data.train: {empty_draws} shards in a row gave no sample (last {url}) "
                                f"in source {source.spec!r}")

    def _checked(self, raw_samples: Iterator[dict], account: SampleAccount) -> Iterator[Sample]:
        """Usable samples, joined with their stored teacher embeddings (when the run reads them)."""
        for raw in raw_samples:
            sample = check_sample(raw)
            if isinstance(sample, str):
                account.skip(sample, raw["__url__"])
                continue
            account.ok(raw["__url__"])
            yield self._join_stored(sample)

    def _join_stored(self, sample: Sample) -> Sample:
        """`sample` with its stored teacher embeddings when the run reads them (sidecar.py)."""
        if self.embeddings is not None:
            if self._join is None:
                self._join = SidecarJoin(self.embeddings, self.plan.shards_side_by_side())
            sample.stored = self._join.lookup(sample.url, sample.key)
        return sample

    def _prepare(self, sample: Sample, rng: random.Random, account: SampleAccount):
        """(key, url, captions, crop, stored), or None if the pixels do not decode. `captions`:
        the data.captions_per_image captions drawn for the sample (choose_captions); `stored`:
        None, or the teachers' stored (image, [text per caption]) embeddings of this very crop
        and these captions."""
        try:
            image = decode_image(sample)
        except (OSError, ValueError) as exn:
            log.debug("undecodable image %s in %s: %s", sample.key, sample.url, exn)
            account.skip("undecodable_image", sample.url, already_read=True)
            return None
        k = self.cfg.captions_per_image
        if self.embeddings is None:
            chosen = choose_captions(len(sample.captions), k, rng)
            captions = [sample.captions[c] for c in chosen]
            return sample.key, sample.url, captions, self.views.crop(image, rng), None
        box, captions, stored = self._stored_choice(sample, rng)
        return sample.key, sample.url, captions, self.views.crop_at(image, box), stored

    def _stored_choice(self, sample: Sample, rng: random.Random) -> tuple[tuple, list, tuple]:
        """One of the sample's stored augmentations and K of its captions, drawn by the
        sample's own RNG (so a resumed run draws the same): (crop box, captions, embeddings)."""
        info = self.embeddings.info(sample.url)
        where = f"sample {sample.key} of {sample.url}"
        if sample.stored is None:
            raise DataError(f"{where}: no stored embeddings in {self.embeddings.name}/ "
                            f"(rerun clip-data embed on these shards)")
        augmentation = rng.randrange(info["augmentations"])
        chosen = choose_captions(len(sample.captions), self.cfg.captions_per_image, rng)
        box, images, texts = pick(sample.stored, len(sample.captions), info["dtype"],
                                  len(info["teachers"]), augmentation, chosen, where)
        return box, [sample.captions[c] for c in chosen], (images, texts)

    def _collate(self, items: list[tuple]) -> dict:
        """The batch without the views that equal another one (ALIASED_KEYS): those travel once.
        K captions per image make K text rows per image, image-major (text [B*K, ctx]).
        Stored embeddings travel as `stored_image.T` [B, D_T] / `stored_text.T` [B*K, D_T] per
        teacher T."""
        keys, urls, captions, crops, stored = zip(*items)
        captions = [caption for chosen in captions for caption in chosen]
        image, teacher_image = self.views.batch_views(torch.stack(crops))
        text = self.tokenizer(captions)
        batch = {"image": image, "text": text, "text_length": text_length(text, self.tokenizer),
                 "key": list(keys), "url": list(urls), "caption": captions}
        if not self.views.shared:
            batch["teacher_image"] = teacher_image  # None without a teacher
        if self.teacher_tokenizer is not None:
            batch["teacher_text"] = self.teacher_tokenizer(captions)
            batch["teacher_text_length"] = text_length(batch["teacher_text"],
                                                       self.teacher_tokenizer)
        if stored[0] is not None:
            for t in range(len(stored[0][0])):
                batch[f"stored_image.{t}"] = torch.stack([images[t] for images, _ in stored])
                batch[f"stored_text.{t}"] = torch.cat([texts[t] for _, texts in stored])
        return batch


def text_length(ids: torch.Tensor, tokenizer: Callable) -> int:
    """The batch's used token positions: up to the last position any row holds a non-padding id
    in. Counted here on the CPU, so that no training step reads the ids back from its device
    (training/text_prefix.py runs causal text towers on these positions only)."""
    used = (ids != getattr(tokenizer, "pad_id", 0)).any(dim=0).nonzero()
    return int(used[-1]) + 1 if len(used) else 1


def choose_captions(available: int, k: int, rng: random.Random) -> list[int]:
    """Indices of the K captions of a sample, drawn by the sample's own RNG (seeded by the seed,
    the epoch and its position: a resumed run draws the same). K distinct captions in random
    order when the sample has at least K; fewer: all of them in random order, cycled to K (so an
    image with one caption has it K times). K = 1 draws exactly what rng.choice did."""
    if k == 1:
        return [rng.randrange(available)]
    order = rng.sample(range(available), min(k, available))
    return [order[i % len(order)] for i in range(k)]


_ERRORS = {cls.__name__: cls for cls in (DataError, CorruptDataError)}


class TrainLoader:
    """Iterable of one rank's batches for one epoch (from `skip_batches` on).

    Batches: dict(image [B,3,H,W], teacher_image [B,3,H',W'] | None (the same tensor as image when
    both preprocessings agree), text [B*K,ctx] LongTensor (K = data.captions_per_image captions
    per image, image-major), teacher_text [B*K,ctx'] (the teacher tokenizer's ids; the same
    tensor as text without a teacher tokenizer), text_length / teacher_text_length (int: the
    positions before the batch's padding, training/text_prefix.py), key, url (its shard) and
    caption list[str] (B*K)).
    len() is the number of batches iterating yields: batches_per_epoch - skip_batches, equal on
    every rank.
    """

    def __init__(self, dataset: _TrainStream, plan: EpochPlan, cfg: DataConfig, skip_batches: int):
        self.dataset, self.plan, self.cfg = dataset, plan, cfg
        self.batches_per_epoch = plan.batches
        self.skip_batches = min(skip_batches, plan.batches)
        self._accounts: dict[int, dict] = {}
        self._samples_seen = 0

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches

    def __iter__(self) -> Iterator[dict]:
        self._accounts, self._samples_seen = {}, 0
        if len(self) == 0:
            return
        workers = self.cfg.workers
        loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            prefetch_factor=2 if workers else None)
        delivered = 0
        for batch in loader:
            if "__error__" in batch:
                name, message = batch["__error__"]
                raise _ERRORS.get(name, DataError)(message)
            self._accounts[batch.pop("__worker__")] = batch.pop("__account__")
            # Aliased here, after the worker queue and pin_memory (which copy each value separately).
            for key, same_as in ALIASED_KEYS:
                if key not in batch:
                    batch[key] = batch[same_as]
            self._samples_seen += len(batch["key"])
            delivered += 1
            yield batch
        if delivered != len(self):
            raise RuntimeError(f"training loader gave {delivered} batches, planned {len(self)}")

    def stats(self) -> dict:
        """Counts since this epoch's iteration began, summed over this rank's workers."""
        skipped = Counter()
        for account in self._accounts.values():
            skipped.update(account["skipped"])
        total = lambda key: sum(account[key] for account in self._accounts.values())
        return {
            "samples_seen": self._samples_seen,
            "corrupt_skipped": sum(skipped.values()),
            "corrupt_by_reason": dict(skipped),
            "samples_read": total("read"),
            "shard_errors": total("shard_errors"),
            "samples_repeated": total("repeated"),
            "read_retries": total("read_retries"),
            "samples_dropped": self.plan.dropped,
        }


def build_train_loader(cfg: DataConfig, *, seed: int, student_preprocess: dict,
                       teacher_preprocess: dict | None, tokenizer: Callable,
                       teacher_tokenizer: Callable | None = None, rank: int, world_size: int,
                       epoch: int, skip_batches: int = 0, accum: int = 1,
                       lanes: int | None = None, stream: str = "",
                       embeddings: EmbeddingSets | None = None) -> TrainLoader:
    """The loader of one rank for one epoch; cheap to build (reads only sizes.json files), so the
    trainer builds one per epoch.

    `cfg` as `cfg.validate()` accepted it (not checked again here); `seed` (the run's seed, with
    the epoch) seeds every random choice. `tokenizer` makes batch["text"]; `teacher_tokenizer`
    batch["teacher_text"] (None: the very same tensor as batch["text"]). Both run in the loader
    workers. `accum` micro-batches per optimizer step: with `world_size`, they make the global
    batch; `lanes` (default world_size x accum) shapes the exact epoch's global order, which a
    resumed run keeps whatever its world size (order.py); `skip_batches` of this rank's
    micro-batches were trained already. `stream` seeds resampled draws. `embeddings`: the
    teacher embedding set whose stored crops and captions the views use
    (batch["stored_image.T"] / ["stored_text.T"] per teacher T; sidecar.py). Raises DataError
    (one line) for bad sources, shards or arguments."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if skip_batches < 0:
        raise DataError(f"skip_batches must be >= 0, got {skip_batches}")
    configure_reads(ReadPolicy.from_config(cfg))  # also for counting samples while planning
    sources = parse_sources(cfg.train, cfg.train_weights)
    num_workers = max(cfg.workers, 1)
    if cfg.resampled:
        plan = plan_resampled(sources, batch_size=cfg.batch_size, accum=accum,
                              world_size=world_size, num_workers=num_workers,
                              samples_per_epoch=cfg.samples_per_epoch)
    else:
        plan = plan_exact(sources, batch_size=cfg.batch_size, accum=accum, rank=rank,
                          world_size=world_size, lanes=lanes or world_size * accum,
                          num_workers=num_workers, seed=seed, epoch=epoch,
                          window=cfg.shuffle_buffer, samples_per_epoch=cfg.samples_per_epoch)
    views = PairedViews(ViewSpec.from_preprocess(student_preprocess, "student_preprocess"),
                        ViewSpec.from_preprocess(teacher_preprocess, "teacher_preprocess")
                        if teacher_preprocess is not None else None)
    dataset = _TrainStream(cfg, sources, plan, views, tokenizer, teacher_tokenizer, seed=seed,
                           rank=rank, epoch=epoch, skip_batches=skip_batches, stream=stream,
                           embeddings=embeddings)
    return TrainLoader(dataset, plan, cfg, skip_batches)
