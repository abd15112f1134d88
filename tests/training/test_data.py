"""Training loader: exact epochs, resampled epochs, ranks, resume, weights (docs/data-pipeline.md)."""
from __future__ import annotations

import itertools
import json
import posixpath
from collections import Counter

import pytest
import torch

import training.data.loader as loader_module
from tests.helpers.data_pipeline import epoch_keys, train_loader
from tests.helpers.shards import make_synthetic_shards
from training.data import DataError

BATCH = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """500 train samples in 8 shards (7 x 64 + 52): uneven, so exact epochs must drop some."""
    return make_synthetic_shards(tmp_path_factory.mktemp("synthetic"), train=500, val=64, zeroshot=0)


def exact(shards, **overrides) -> dict:
    defaults = dict(train=shards["train_shards"], batch_size=BATCH, workers=0, shuffle_buffer=50, seed=3)
    return {**defaults, **overrides}


def resampled(shards, **overrides) -> dict:
    return exact(shards, samples_per_epoch=320, resampled=True, **overrides)


def shard_of(url: str) -> str:
    return posixpath.basename(url)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_epoch_splits_shards_between_ranks_and_counts_the_drop(shards, workers):
    loaders = [train_loader(exact(shards, workers=workers), rank=r, world_size=2) for r in range(2)]
    batches = [list(loader) for loader in loaders]
    sizes = json.loads((shards["train"] / "sizes.json").read_text())
    # Every reader (rank x worker) owns 2 shards; the bound takes the 2 smallest (52 + 64 samples).
    per_worker = (52 + 64) // BATCH
    expected = per_worker * max(workers, 1) if workers else (52 + 3 * 64) // BATCH
    assert [len(loader) for loader in loaders] == [expected, expected]
    assert [len(b) for b in batches] == [expected, expected]
    keys = [[k for batch in rank_batches for k in batch["key"]] for rank_batches in batches]
    shards_read = [{shard_of(u) for batch in rank_batches for u in batch["url"]} for rank_batches in batches]
    assert not shards_read[0] & shards_read[1]
    assert shards_read[0] | shards_read[1] == set(sizes)
    assert len(set(keys[0])) == len(keys[0]) and not set(keys[0]) & set(keys[1])
    delivered = 2 * expected * BATCH
    stats = loaders[0].stats()
    assert stats["samples_dropped"] == 500 - delivered
    assert stats["samples_seen"] == expected * BATCH
    assert stats["corrupt_skipped"] == 0 and stats["samples_repeated"] == 0


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
    cfg = dict(train=spec, train_weights=[3, 1], resampled=True, samples_per_epoch=1200,
               batch_size=100, workers=0, shuffle_buffer=0, seed=0)
    urls = [u for batch in train_loader(cfg) for u in batch["url"]]
    first = sum(u.startswith(str(shards["train"])) for u in urls) / len(urls)
    assert len(urls) == 1200
    assert abs(first - 0.75) < 0.05  # 4 binomial sd at n=1200


@pytest.mark.parametrize("cfg, world_size, message", [
    (dict(workers=2), 8, "need at least world_size x workers = 8 x 2 = 16 shards, found 8"),
    (dict(train_weights=[1.0]), 1, "data.train_weights: sampling weights need data.resampled=true"),
    (dict(train_weights=[1.0, 2.0], resampled=True, samples_per_epoch=100), 1, "2 weights for 1 sources"),
    (dict(batch_size=0), 1, "data.batch_size: invalid value 0"),
    (dict(batch_size=1000), 1, "give no full batch of 1000"),
    (dict(resampled=True, samples_per_epoch=10), 1, "data.samples_per_epoch=10 gives no batch of 16"),
    (dict(train="nosuch://bucket/x-{0..3}.tar"), 1, "data.train: cannot open nosuch:// URLs"),
    (dict(train="a.tar::"), 1, "data.train: empty source between '::'"),
])
def test_bad_configuration_is_one_clear_error(shards, cfg, world_size, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        train_loader({**exact(shards), **cfg}, world_size=world_size)
    assert "\n" not in str(error.value)


def test_missing_local_shard_is_named(shards, tmp_path):
    spec = f"{shards['train_shards']}::{tmp_path}/missing-{{0..3}}.tar"
    with pytest.raises(DataError, match=f"shard not found: {tmp_path}/missing-0.tar \\(and 3 more\\)"):
        train_loader(exact(shards, train=spec))


def test_seed_argument_replaces_the_config_seed(shards):
    first = lambda **kw: next(iter(train_loader(exact(shards), **kw)))["key"]
    assert first(seed=3) == first()  # exact() sets data.seed=3
    assert first(seed=4) != first()


def test_config_from_an_omegaconf_section_with_other_keys(shards):
    from omegaconf import OmegaConf
    section = OmegaConf.create({**exact(shards), "val": "ignored", "resampled": True, "samples_per_epoch": None})
    loader = train_loader(section)
    assert loader.batches_per_epoch == 500 // BATCH  # resampled without samples_per_epoch: the listed size
