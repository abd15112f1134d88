"""The training loader: batches of paired views and tokens, planned so that every rank runs the same
number of steps and a resumed run sees exactly the batches an uninterrupted one would have seen.

Per dataloader worker the stream is

    shards (plan.py) -> grouped raw samples -> cheap checks (skip + count) -> seeded shuffle buffer
    -> drop the batches a resumed run already trained on (before decoding) -> decode, caption,
    paired crop (one seeded RNG per sample position) -> batch -> tokenize (student, teacher)

Everything random is seeded by (seed, epoch, rank, worker) and the sample's position in that
worker's stream, never by process state, so (seed, epoch, skip_batches) fixes the stream.
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
from .plan import EpochPlan, plan_exact, plan_resampled
from .samples import CorruptDataError, Sample, SampleAccount, check_sample, decode_image, read_shard
from .sidecar import EmbeddingSets, SidecarJoin, pick
from .sources import DataError, Source, parse_sources
from .views import PairedViews, ViewSpec

log = logging.getLogger(__name__)

# A source that yields nothing for this many shard draws in a row is treated as unreadable.
MAX_EMPTY_DRAWS = 20


# Batch keys that may be the very same object as another key's value: (key, same as). A worker
# leaves such a key out of its batch when it would equal the other one; TrainLoader puts it back.
ALIASED_KEYS = (("teacher_image", "image"), ("teacher_text", "text"))


class _TrainStream(IterableDataset):
    """One rank's batches for one epoch; each dataloader worker produces its share (plan.py)."""

    def __init__(self, cfg: DataConfig, sources: list[Source], plan: EpochPlan, views: PairedViews,
                 tokenizer: Callable, teacher_tokenizer: Callable | None, *, seed: int, rank: int,
                 epoch: int, skip_batches: int, embeddings: EmbeddingSets | None = None):
        self.cfg, self.sources, self.plan, self.views = cfg, sources, plan, views
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer
        self.seed, self.rank, self.epoch, self.skip_batches = seed, rank, epoch, skip_batches
        self.embeddings = embeddings
        self._join = None  # per worker: the sidecar shard being read (SidecarJoin)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        # DataLoader asks its worker 0 first. Batch i of the epoch belongs to plan worker
        # i % num_workers, so a loader resuming at batch k lets its worker d play plan worker
        # (k + d) % num_workers: the round-robin then continues exactly where the first run stopped.
        worker = ((info.id if info is not None else 0) + self.skip_batches) % self.plan.num_workers
        try:
            yield from self._batches(worker)
        except DataError as exn:
            # Raised here it would reach the trainer wrapped in the worker's traceback; the loader
            # re-raises it in the main process with its one-line message.
            yield {"__error__": (type(exn).__name__, str(exn))}

    def _batches(self, worker: int) -> Iterator[dict]:
        cfg, plan = self.cfg, self.plan
        tag = f"{self.seed}:{self.epoch}:{self.rank}:{worker}"
        account = SampleAccount(cfg.max_corrupt_fraction, cfg.corrupt_min_samples)
        quota = plan.worker_batches(worker)
        skip = plan.worker_batches(worker, before=self.skip_batches)
        if skip >= quota:
            return
        if plan.resampled:
            samples = self._shuffled(self._checked(self._resampled(tag, account), account), tag)
        else:
            samples = self._exact(plan.worker_shards[worker], tag, account)
        positioned = itertools.islice(enumerate(samples), skip * cfg.batch_size, None)
        delivered, repeated, pending = skip, 0, []
        for index, sample in positioned:
            item = self._prepare(sample, random.Random(f"sample:{tag}:{index}"), account)
            if item is None:
                continue
            pending.append(item)
            repeated += sample.pass_index > 0
            if len(pending) == cfg.batch_size:
                batch = self._collate(pending)
                batch["__worker__"] = worker
                batch["__account__"] = dict(account.snapshot(), repeated=repeated)
                yield batch
                delivered, pending = delivered + 1, []
                if delivered == quota:
                    return
        if delivered < quota:
            raise DataError(f"data.train: worker {worker} of rank {self.rank} ran out of samples after "
                            f"{delivered} of {quota} batches")

    def _exact(self, shards: tuple[str, ...], tag: str, account: SampleAccount) -> Iterator[Sample]:
        """The worker's shards once, shuffled; then again (pass 1, 2, ...) only if corrupt samples
        left it short of its quota: every rank must deliver the planned number of batches. The
        shuffle buffer is flushed at the end of each pass, so a pass never mixes with the next."""
        for pass_index in itertools.count():
            account.frozen = pass_index > 0
            found = 0
            raw = (raw for url in shards for raw in self._read_listed(url, account))
            for sample in self._shuffled(self._checked(raw, account), f"{tag}:{pass_index}"):
                found += 1
                sample.pass_index = pass_index
                yield sample
            if found == 0:
                raise DataError(f"data.train: no usable sample in the {len(shards)} shards starting with {shards[0]}")

    def _read_listed(self, url: str, account: SampleAccount) -> Iterator[dict]:
        """read_shard, plus a check that a shard read to its end had the samples its listing
        promised: a tar cut exactly between two members reads as a complete, shorter tar."""
        found = 0
        for raw in read_shard(url, account):
            found += 1
            yield raw
        listed = self.plan.shard_sizes.get(url, 0)
        if found < listed and not account.frozen and url not in account.shard_errors:
            log.warning("shard %s gave %d samples, its listing says %d", url, found, listed)
            account.shard_errors[url] += 1

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
        while True:
            url = draw.choice(source.urls)
            found = 0
            for raw in read_shard(url, account):
                found += 1
                yield raw
            empty_draws = 0 if found else empty_draws + 1
            if empty_draws >= MAX_EMPTY_DRAWS:
                raise DataError(f"data.train: {empty_draws} shards in a row gave no sample (last {url}) "
                                f"in source {source.spec!r}")

    def _checked(self, raw_samples: Iterator[dict], account: SampleAccount) -> Iterator[Sample]:
        """Usable samples, joined with their stored teacher embeddings (when the run reads them)
        while their shard is being read: the join holds one sidecar shard at a time."""
        if self.embeddings is not None and self._join is None:
            self._join = SidecarJoin(self.embeddings)
        for raw in raw_samples:
            sample = check_sample(raw)
            if isinstance(sample, str):
                account.skip(sample, raw["__url__"])
                continue
            account.ok(raw["__url__"])
            if self._join is not None:
                sample.stored = self._join.lookup(sample.url, sample.key)
            yield sample

    def _prepare(self, sample: Sample, rng: random.Random, account: SampleAccount):
        """(key, url, caption, crop, stored), or None if the pixels do not decode. `stored`:
        None, or the teachers' stored (image, text) embeddings of this very crop and caption."""
        try:
            image = decode_image(sample)
        except (OSError, ValueError) as exn:
            log.debug("undecodable image %s in %s: %s", sample.key, sample.url, exn)
            account.skip("undecodable_image", sample.url, already_read=True)
            return None
        if self.embeddings is None:
            caption = rng.choice(sample.captions)
            return sample.key, sample.url, caption, self.views.crop(image, rng), None
        box, caption, stored = self._stored_choice(sample, rng)
        return sample.key, sample.url, caption, self.views.crop_at(image, box), stored

    def _stored_choice(self, sample: Sample, rng: random.Random) -> tuple[tuple, str, tuple]:
        """One of the sample's stored augmentations and one of its captions, drawn by the
        sample's own RNG (so a resumed run draws the same): (crop box, caption, embeddings)."""
        info = self.embeddings.info(sample.url)
        where = f"sample {sample.key} of {sample.url}"
        if sample.stored is None:
            raise DataError(f"{where}: no stored embeddings in {self.embeddings.name}/ "
                            f"(rerun clip-data embed on these shards)")
        augmentation = rng.randrange(info["augmentations"])
        caption = rng.randrange(len(sample.captions))
        box, images, texts = pick(sample.stored, len(sample.captions), info["dtype"],
                                  len(info["teachers"]), augmentation, caption, where)
        return box, sample.captions[caption], (images, texts)

    def _collate(self, items: list[tuple]) -> dict:
        """The batch without the views that equal another one (ALIASED_KEYS): those travel once.
        Stored embeddings travel as `stored_image.T` / `stored_text.T` [B, D_T] per teacher T."""
        keys, urls, captions, crops, stored = zip(*items)
        captions = list(captions)
        image, teacher_image = self.views.batch_views(torch.stack(crops))
        batch = {"image": image, "text": self.tokenizer(captions),
                 "key": list(keys), "url": list(urls), "caption": captions}
        if not self.views.shared:
            batch["teacher_image"] = teacher_image  # None without a teacher
        if self.teacher_tokenizer is not None:
            batch["teacher_text"] = self.teacher_tokenizer(captions)
        if stored[0] is not None:
            for t in range(len(stored[0][0])):
                batch[f"stored_image.{t}"] = torch.stack([images[t] for images, _ in stored])
                batch[f"stored_text.{t}"] = torch.stack([texts[t] for _, texts in stored])
        return batch


_ERRORS = {cls.__name__: cls for cls in (DataError, CorruptDataError)}


class TrainLoader:
    """Iterable of one rank's batches for one epoch (from `skip_batches` on).

    Batches: dict(image [B,3,H,W], teacher_image [B,3,H',W'] | None (the same tensor as image when
    both preprocessings agree), text [B,ctx] LongTensor, teacher_text [B,ctx'] (the teacher
    tokenizer's ids; the same tensor as text without a teacher tokenizer), key, url (its shard)
    and caption list[str]).
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
            "samples_dropped": self.plan.dropped,
        }


def build_train_loader(cfg: DataConfig, *, seed: int, student_preprocess: dict,
                       teacher_preprocess: dict | None, tokenizer: Callable,
                       teacher_tokenizer: Callable | None = None, rank: int, world_size: int,
                       epoch: int, skip_batches: int = 0,
                       embeddings: EmbeddingSets | None = None) -> TrainLoader:
    """The loader of one rank for one epoch; cheap to build (reads only sizes.json files), so the
    trainer builds one per epoch.

    `cfg` as `cfg.validate()` accepted it (not checked again here); `seed` (the run's seed, with
    the epoch) seeds every random choice. `tokenizer` makes batch["text"]; `teacher_tokenizer`
    batch["teacher_text"] (None: the very same tensor as batch["text"]). Both run in the loader
    workers. `embeddings`: the teacher embedding set whose stored crops and captions the views
    use (batch["stored_image.T"] / ["stored_text.T"] per teacher T; sidecar.py). Raises
    DataError (one line) for bad sources, shards or arguments."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if skip_batches < 0:
        raise DataError(f"skip_batches must be >= 0, got {skip_batches}")
    sources = parse_sources(cfg.train, cfg.train_weights)
    num_workers = max(cfg.workers, 1)
    if cfg.resampled:
        plan = plan_resampled(sources, batch_size=cfg.batch_size, world_size=world_size,
                              num_workers=num_workers, samples_per_epoch=cfg.samples_per_epoch)
    else:
        plan = plan_exact(sources, batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                          num_workers=num_workers, seed=seed, epoch=epoch,
                          samples_per_epoch=cfg.samples_per_epoch)
    views = PairedViews(ViewSpec.from_preprocess(student_preprocess, "student_preprocess"),
                        ViewSpec.from_preprocess(teacher_preprocess, "teacher_preprocess")
                        if teacher_preprocess is not None else None)
    dataset = _TrainStream(cfg, sources, plan, views, tokenizer, teacher_tokenizer, seed=seed,
                           rank=rank, epoch=epoch, skip_batches=skip_batches, embeddings=embeddings)
    return TrainLoader(dataset, plan, cfg, skip_batches)
