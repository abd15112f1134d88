"""The `data:` section of a training config: THE DataConfig, and its rules (docs/data-pipeline.md).

It is the schema section (an OmegaConf structured dataclass: OmegaConf checks the types when a
YAML file is loaded) and what `build_train_loader` reads. `validate()` checks every data rule, once,
before any work; the loader trusts a validated config. Light on purpose (no torch, no webdataset):
`training.config` imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import braceexpand
from omegaconf import MISSING

from training.config_files import ConfigError

SOURCE_SEPARATOR = "::"  # joins several sources in data.train


@dataclass
class DataConfig:
    train: str = MISSING  # shard spec: brace-expanded paths / pipe: / URLs; sources joined by '::'
    train_weights: Optional[List[float]] = None  # sampling weight per '::' source (resampled)
    resampled: bool = False  # True: infinite sampling, an "epoch" is samples_per_epoch samples
    samples_per_epoch: Optional[int] = None  # total over all ranks; required when resampled
    batch_size: int = 32  # per rank, per micro-batch
    # Captions per image in a batch (K text rows per image; docs/objectives.md): drawn from the
    # sample's json "captions" per seed and sample; fewer than K: all of them, cycled.
    captions_per_image: int = 1
    workers: int = 1  # DataLoader workers per rank
    shuffle_buffer: int = 1000
    max_corrupt_fraction: float = 0.01  # stop with an error above this fraction of bad samples
    corrupt_min_samples: int = 1000  # ... once at least this many samples were read
    # Non-local reads (pipe:, http(s), s3://, gs://, ...): docs/data-pipeline.md, "Remote shards"
    read_timeout_s: float = 60.0  # a read that gets no byte for this long failed
    read_retries: int = 3  # retries of a failed read (backoff doubling), then a one-line error
    retry_backoff_s: float = 1.0  # wait before the first retry
    read_ahead: int = 1  # remote shards each worker downloads ahead of the one it reads

    def validate(self) -> None:
        """Every rule of the data section; raises ConfigError("key data.<name>: <message>")."""
        train = self.train
        _require(train != MISSING, "train", "required value is missing")
        _require(isinstance(train, str) and bool(train.strip()), "train",
                 f"must be a non-empty shard spec, got {train!r}")
        parts = [part.strip() for part in train.split(SOURCE_SEPARATOR)]
        _require(all(parts), "train", f"empty source between '{SOURCE_SEPARATOR}' in {train!r}")
        _require(all(_braces_balanced(p) for p in parts), "train",
                 f"unbalanced braces in {train!r} (a shard pattern looks like "
                 f"DIR/shard-{{000000..000009}}.tar)")
        for name, low in (("batch_size", 1), ("captions_per_image", 1), ("workers", 0), ("shuffle_buffer", 0),
                          ("corrupt_min_samples", 0), ("read_retries", 0), ("read_ahead", 0)):
            value = getattr(self, name)
            _require(_is_int(value) and value >= low, name, f"must be an integer >= {low}, got {value!r}")
        fraction = self.max_corrupt_fraction
        _require(_is_number(fraction) and 0 <= fraction <= 1, "max_corrupt_fraction",
                 f"must be in [0, 1], got {fraction!r}")
        timeout, backoff = self.read_timeout_s, self.retry_backoff_s
        _require(_is_number(timeout) and 0 < timeout < math.inf, "read_timeout_s",
                 f"must be a number of seconds > 0, got {timeout!r}")
        _require(_is_number(backoff) and 0 <= backoff < math.inf, "retry_backoff_s",
                 f"must be a number of seconds >= 0, got {backoff!r}")
        spe = self.samples_per_epoch
        _require(spe is None or (_is_int(spe) and spe > 0), "samples_per_epoch",
                 f"must be > 0 or null, got {spe!r}")
        _require(not self.resampled or spe is not None, "samples_per_epoch",
                 "required (> 0) when data.resampled is true")
        weights = self.train_weights
        if weights is not None:
            _require(self.resampled, "train_weights",
                     "sampling weights need data.resampled=true (exact epochs read every sample once)")
            _require(len(weights) == len(parts), "train_weights",
                     f"needs one weight per '{SOURCE_SEPARATOR}' source ({len(parts)}), got {len(weights)}")
            _require(all(_is_number(w) and w > 0 for w in weights), "train_weights",
                     f"weights must be positive, got {list(weights)}")


def _braces_balanced(pattern: str) -> bool:
    """What braceexpand (webdataset's pattern syntax) accepts: it raises on the first item."""
    try:
        next(braceexpand.braceexpand(pattern), None)
    except braceexpand.UnbalancedBracesError:
        return False
    return True


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"key data.{name}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
