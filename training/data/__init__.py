"""Training data: WebDataset shards streamed into batches of paired teacher/student views.

Public API (docs/data-pipeline.md):
    DataConfig (the `data:` config section; .validate() checks its rules once)
    build_train_loader(cfg, *, seed, student_preprocess, teacher_preprocess, tokenizer,
                       teacher_tokenizer=None, rank, world_size, epoch, skip_batches=0) -> TrainLoader
    DataError (one-line bad-input errors), CorruptDataError

Modules: config (DataConfig), sources (specs, URL opening), samples (tar -> checked samples, skip
accounting), plan (shard assignment and batch counts), views (paired crops), loader (training).
Evaluation sets (every sample once, all captions, labels) are read by training.evaluation.datasets.

Only `config` is imported eagerly: `training.config` imports DataConfig, and the other modules
pull in torch and webdataset (seconds), which config loading and validation do not need.
"""
from __future__ import annotations

import importlib

from .config import DataConfig

_LAZY = {"build_train_loader": ".loader", "TrainLoader": ".loader",
         "DataError": ".sources", "CorruptDataError": ".samples"}

__all__ = ["build_train_loader", "DataConfig", "TrainLoader", "DataError", "CorruptDataError"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
