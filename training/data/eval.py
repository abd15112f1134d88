"""The evaluation loader: validation and zero-shot shard sets read once, in order, unaugmented.

Every sample is read exactly once (shards in spec order; with workers, worker w reads shards
w::workers), so retrieval and zero-shot metrics cover the whole set. Captions and class labels are
kept: retrieval needs all captions of an image, zero-shot needs `.cls`.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Iterator

import open_clip
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .plan import ShardSizes
from .samples import SampleAccount, check_sample, decode_image, read_shard
from .sources import DataError, parse_sources


def eval_transform(preprocess: dict | Callable) -> Callable:
    """open_clip's validation transform from a preprocess dict (or an open_clip transform as is)."""
    if callable(preprocess):
        return preprocess
    size = preprocess.get("size", preprocess.get("image_size"))
    if size is None:
        raise DataError(f"preprocess: needs size (or image_size), got keys {sorted(preprocess)}")
    return open_clip.image_transform(
        size, is_train=False, mean=preprocess.get("mean"), std=preprocess.get("std"),
        resize_mode=preprocess.get("resize_mode"), interpolation=preprocess.get("interpolation"),
        fill_color=preprocess.get("fill_color", 0))


class _EvalStream(IterableDataset):
    def __init__(self, urls: list[str], transform: Callable, tokenizer: Callable, batch_size: int,
                 all_captions: bool):
        self.urls, self.transform, self.tokenizer = urls, transform, tokenizer
        self.batch_size, self.all_captions = batch_size, all_captions

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        account = SampleAccount()
        pending = []
        for url in self.urls[worker::workers]:
            for raw in read_shard(url, account):
                sample = check_sample(raw)
                if isinstance(sample, str):
                    account.skip(sample, url)
                    continue
                try:
                    image = self.transform(decode_image(sample))
                except (OSError, ValueError):
                    account.skip("undecodable_image", url)
                    continue
                account.ok(url)
                pending.append((sample, image))
                if len(pending) == self.batch_size:
                    yield self._collate(pending, worker, account)
                    pending = []
        if pending:
            yield self._collate(pending, worker, account)
        else:  # the counts of a worker whose samples were all skipped still reach stats()
            yield {"__worker__": worker, "__account__": account.snapshot()}

    def _collate(self, items: list, worker: int, account: SampleAccount) -> dict:
        samples = [sample for sample, _ in items]
        labels = [sample.label for sample in samples]
        return {
            "image": torch.stack([image for _, image in items]),
            "text": self.tokenizer([sample.captions[0] for sample in samples]),
            "captions": [sample.captions if self.all_captions else sample.captions[:1] for sample in samples],
            "label": None if all(l is None for l in labels) else
            torch.tensor([-1 if l is None else l for l in labels], dtype=torch.long),
            "key": [sample.key for sample in samples],
            "__worker__": worker, "__account__": account.snapshot(),
        }


class EvalLoader:
    """Iterable of eval batches: dict(image [B,3,H,W], text [B,ctx] (first caption), captions
    list[list[str]], label LongTensor[B] (class index, -1 where missing) or None (no `.cls` at all),
    key list[str]). Unusable samples are skipped and counted in stats()."""

    def __init__(self, dataset: _EvalStream, workers: int):
        self.dataset, self.workers = dataset, workers
        self._accounts: dict[int, dict] = {}

    def num_samples(self) -> int:
        """Samples listed for the set (sizes.json / *_stats.json, else counted)."""
        sizes = ShardSizes()
        return sum(sizes(url) for url in self.dataset.urls)

    def __len__(self) -> int:
        sizes = ShardSizes()
        per_worker = [sum(sizes(u) for u in self.dataset.urls[w::max(self.workers, 1)])
                      for w in range(max(self.workers, 1))]
        return sum(math.ceil(n / self.dataset.batch_size) for n in per_worker)

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers)
        self._accounts = {}
        for batch in loader:
            self._accounts[batch.pop("__worker__")] = batch.pop("__account__")
            if "image" in batch:
                yield batch

    def stats(self) -> dict:
        skipped = Counter()
        for account in self._accounts.values():
            skipped.update(account["skipped"])
        return {"samples_read": sum(a["read"] for a in self._accounts.values()),
                "corrupt_skipped": sum(skipped.values()), "corrupt_by_reason": dict(skipped),
                "shard_errors": sum(a["shard_errors"] for a in self._accounts.values())}


def build_eval_loader(path_spec: str, preprocess: dict | Callable, tokenizer: Callable, batch_size: int,
                      all_captions: bool = True, workers: int = 0) -> EvalLoader:
    """Loader over a validation or zero-shot shard set (same spec syntax as data.train)."""
    if batch_size < 1:
        raise DataError(f"batch_size: invalid value {batch_size!r}")
    urls = [url for source in parse_sources(path_spec) for url in source.urls]
    if workers > len(urls):
        workers = len(urls)  # a worker without a shard would only add start-up time
    dataset = _EvalStream(urls, eval_transform(preprocess), tokenizer, batch_size, all_captions)
    return EvalLoader(dataset, workers)
