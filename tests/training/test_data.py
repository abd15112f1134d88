"""Training loader: exact epochs, resampled epochs, ranks, resume, weights (docs/data-pipeline.md)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import posixpath
import re
from collections import Counter

import pytest
import torch

import training.data.loader as loader_module
from tests.helpers import data_pipeline
from tests.helpers.data_pipeline import epoch_keys
from tests.helpers.shards import make_synthetic_shards
from training.config_files import ConfigError
from training.data import DataConfig, DataError

BATCH = 16
SEED = 3


def train_loader(cfg: DataConfig, **overrides):
    """The tiny-model loader with this file's seed unless given."""
    return data_pipeline.train_loader(cfg, **{"seed": SEED, **overrides})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """500 train samples in 8 shards (7 x 64 + 52): uneven, so exact epochs must drop some."""
    return make_synthetic_shards(tmp_path_factory.mktemp("synthetic"), train=500, val=64, zeroshot=0)


def exact(shards, **overrides) -> DataConfig:
    defaults = dict(train=shards["train_shards"], batch_size=BATCH, workers=0, shuffle_buffer=50)
    return DataConfig(**{**defaults, **overrides})


def resampled(shards, **overrides) -> DataConfig:
    return exact(shards, samples_per_epoch=320, resampled=True, **overrides)


def shard_of(url: str) -> str:
    return posixpath.basename(url)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_epoch_uses_every_sample_once_whatever_the_world_size(shards, workers):
    """500 samples in 8 uneven shards, a global batch of 32: 2 ranks, or 1 rank with 2
    micro-batches per step, take the same 15 global batches (480 samples, each once, the same
    crops); the 20 left over are counted as dropped."""
    cfg = exact(shards, workers=workers)
    two = [train_loader(cfg, rank=r, world_size=2) for r in range(2)]
    batches = [list(loader) for loader in two]
    steps = 500 // (2 * BATCH)
    assert [len(b) for b in batches] == [len(loader) for loader in two] == [steps, steps]
    keys = [k for rank_batches in batches for batch in rank_batches for k in batch["key"]]
    assert len(keys) == len(set(keys)) == steps * 2 * BATCH
    one = list(train_loader(cfg, accum=2))
    by_step = [batches[r][s] for s in range(steps) for r in range(2)]  # rank 0's, then rank 1's
    assert [b["key"] for b in one] == [b["key"] for b in by_step]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(one, by_step))
    stats = two[0].stats()
    assert stats["samples_dropped"] == 500 - steps * 2 * BATCH == 20
    assert stats["samples_seen"] == steps * BATCH
    assert stats["corrupt_skipped"] == 0 and stats["samples_repeated"] == 0


def test_resume_on_another_world_size_continues_with_the_unseen_samples(shards):
    """4 of 15 steps done on 2 ranks; the rest on 1 rank (2 micro-batches per step, lanes kept):
    every sample of the epoch once, in the uninterrupted run's order."""
    cfg = exact(shards)
    full = list(train_loader(cfg, accum=2))
    done = [b["key"] for r in range(2)
            for b in itertools.islice(train_loader(cfg, rank=r, world_size=2), 4)]
    rest = list(train_loader(cfg, accum=2, lanes=2, skip_batches=8))
    seen = sum(done, []) + [k for b in rest for k in b["key"]]
    assert sorted(seen) == sorted(k for b in full for k in b["key"])
    assert [b["key"] for b in rest] == [b["key"] for b in full[8:]]


def test_ranks_that_share_a_lane_take_the_same_samples_as_one_rank(shards):
    """A 2-lane order (a run started on 2 ranks) continued on 3 ranks: rank 1's positions span
    both lanes; together the 3 ranks take what 1 rank with 3 micro-batches takes."""
    cfg = exact(shards, batch_size=4)
    three = [list(train_loader(cfg, rank=r, world_size=3, lanes=2)) for r in range(3)]
    one = list(train_loader(cfg, accum=3, lanes=2))
    assert len(one) == 3 * len(three[0]) == 3 * (500 // 2 // 6)
    assert [b["key"] for b in one] == [three[r][s]["key"] for s in range(len(three[0]))
                                       for r in range(3)]


def test_one_shard_is_enough_for_two_ranks(shards):
    cfg = exact(shards, train=str(shards["train"] / "shard-000000.tar"))
    keys = [k for r in range(2) for b in train_loader(cfg, rank=r, world_size=2) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 64


def test_exact_epoch_length_is_the_same_every_epoch_and_order_changes(shards):
    cfg = exact(shards, workers=0)
    lengths = {len(train_loader(cfg, rank=r, world_size=2, epoch=e)) for r in range(2) for e in range(6)}
    assert len(lengths) == 1
    first_batches = lambda epoch: [b["key"] for b in itertools.islice(train_loader(cfg, epoch=epoch), 3)]
    epoch0, again, epoch1 = first_batches(0), first_batches(0), first_batches(1)
    assert epoch0 == again
    assert epoch0 != epoch1
    assert sorted(sum(epoch0, [])) != sum(epoch0, [])  # shuffled, not in shard order


def test_whole_epoch_on_one_rank_reads_every_sample_once(shards):
    cfg = exact(shards, batch_size=10, shuffle_buffer=0)
    keys = sum(epoch_keys(train_loader(cfg)), [])
    assert len(keys) == 500 and len(set(keys)) == 500


def test_resampled_epoch_length_and_reproducibility(shards):
    cfg = resampled(shards, workers=0)
    loader = train_loader(cfg, rank=1, world_size=2)
    assert len(loader) == 320 // (BATCH * 2)
    keys = epoch_keys(loader)
    assert len(keys) == 10 and all(len(k) == BATCH for k in keys)
    assert keys == epoch_keys(train_loader(cfg, rank=1, world_size=2))
    assert keys != epoch_keys(train_loader(cfg, rank=0, world_size=2))
    assert keys != epoch_keys(train_loader(cfg, rank=1, world_size=2, epoch=1))


@pytest.mark.parametrize("mode", ["exact", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skipping_batches_sees_the_tail_of_the_full_run(shards, mode, workers, monkeypatch):
    cfg = (exact if mode == "exact" else resampled)(shards, workers=workers)
    full = list(train_loader(cfg, rank=1, world_size=2, epoch=2))
    skip = 5
    decoded = Counter()
    if workers == 0:  # count decodes in-process: skipped batches must not be decoded
        original = loader_module.decode_image
        monkeypatch.setattr(loader_module, "decode_image",
                            lambda sample: decoded.update(["n"]) or original(sample))
    resumed_loader = train_loader(cfg, rank=1, world_size=2, epoch=2, skip_batches=skip)
    resumed = list(resumed_loader)
    assert len(resumed_loader) == len(full) - skip == len(resumed)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[skip:]]
    assert [b["caption"] for b in resumed] == [b["caption"] for b in full[skip:]]
    for a, b in zip(resumed, full[skip:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    if workers == 0:
        assert decoded["n"] == len(resumed) * BATCH
    assert resumed_loader.stats()["samples_seen"] == len(resumed) * BATCH


def test_skipping_the_whole_epoch_yields_nothing(shards):
    loader = train_loader(exact(shards), skip_batches=10_000)
    assert len(loader) == 0 and list(loader) == []


def test_resampled_sources_follow_their_weights(shards, tmp_path):
    other = make_synthetic_shards(tmp_path, train=128, val=0, zeroshot=0, seed=1)
    spec = f"{shards['train_shards']}::{other['train_shards']}"
    cfg = DataConfig(train=spec, train_weights=[3, 1], resampled=True, samples_per_epoch=1200,
                     batch_size=100, workers=0, shuffle_buffer=0)
    urls = [u for batch in train_loader(cfg, seed=0) for u in batch["url"]]
    first = sum(u.startswith(str(shards["train"])) for u in urls) / len(urls)
    assert len(urls) == 1200
    assert abs(first - 0.75) < 0.05  # 4 binomial sd at n=1200


@pytest.mark.parametrize("cfg, world_size, message", [
    (dict(batch_size=1000), 1, "give no full global batch of 1000 (1000 per rank"),
    (dict(batch_size=300), 2, "give no full global batch of 600 (300 per rank"),
    (dict(resampled=True, samples_per_epoch=10), 1,
     "data.samples_per_epoch=10 gives no global batch of 16 x 1 micro-batches"),
    (dict(train="nosuch://bucket/x-{0..3}.tar"), 1, "data.train: cannot open nosuch:// URLs"),
])
def test_bad_configuration_is_one_clear_error(shards, cfg, world_size, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        train_loader(dataclasses.replace(exact(shards), **cfg), world_size=world_size)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("cfg, message", [
    (dict(train_weights=[1.0]), "key data.train_weights: sampling weights need data.resampled=true"),
    (dict(train_weights=[1.0, 2.0], resampled=True, samples_per_epoch=100),
     "key data.train_weights: needs one weight per '::' source (1), got 2"),
    (dict(train_weights=[0.0], resampled=True, samples_per_epoch=100),
     "key data.train_weights: weights must be positive, got [0.0]"),
    (dict(batch_size=0), "key data.batch_size: must be an integer >= 1, got 0"),
    (dict(workers=-1), "key data.workers: must be an integer >= 0, got -1"),
    (dict(shuffle_buffer=-1), "key data.shuffle_buffer: must be an integer >= 0, got -1"),
    (dict(corrupt_min_samples=-1), "key data.corrupt_min_samples: must be an integer >= 0, got -1"),
    (dict(max_corrupt_fraction=1.5), "key data.max_corrupt_fraction: must be in [0, 1], got 1.5"),
    (dict(samples_per_epoch=0), "key data.samples_per_epoch: must be > 0 or null, got 0"),
    (dict(resampled=True), "key data.samples_per_epoch: required (> 0) when data.resampled is true"),
    (dict(train=" "), "key data.train: must be a non-empty shard spec, got ' '"),
    (dict(train="a.tar::"), "key data.train: empty source between '::'"),
])
def test_bad_data_setting_is_one_config_error_before_any_work(shards, cfg, message, monkeypatch):
    bad = dataclasses.replace(exact(shards), **cfg)
    with pytest.raises(ConfigError) as error:
        bad.validate()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    monkeypatch.setattr(loader_module, "parse_sources", lambda *a: pytest.fail("read sources"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_loader(bad)  # the helper validates first, as the trainer does


def test_train_is_required():
    with pytest.raises(ConfigError, match="^key data.train: required value is missing$"):
        DataConfig().validate()


def test_missing_local_shard_is_named(shards, tmp_path):
    spec = f"{shards['train_shards']}::{tmp_path}/missing-{{0..3}}.tar"
    with pytest.raises(DataError, match=f"shard not found: {tmp_path}/missing-0.tar \\(and 3 more\\)"):
        train_loader(exact(shards, train=spec))


def test_seed_argument_seeds_the_stream(shards):
    first = lambda seed: next(iter(train_loader(exact(shards), seed=seed)))["key"]
    assert first(3) == first(3)
    assert first(4) != first(3)


def test_config_is_the_schema_section_of_a_structured_omegaconf(shards):
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError
    values = dict(train=shards["train_shards"], batch_size=BATCH, workers=0, resampled=True,
                  samples_per_epoch=320, train_weights=[2])
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), values))
    assert isinstance(cfg, DataConfig) and cfg.train_weights == [2.0] and cfg.shuffle_buffer == 1000
    assert train_loader(cfg).batches_per_epoch == 320 // BATCH  # train_loader validates it
    with pytest.raises(ConfigKeyError):  # other keys (validation sets, seed, ...) are not data keys
        OmegaConf.merge(OmegaConf.structured(DataConfig), {**values, "seed": 3})
