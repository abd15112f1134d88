"""Training data: WebDataset shards streamed into batches of paired teacher/student views.

Public API (docs/data-pipeline.md):
    build_train_loader(cfg, *, student_preprocess, teacher_preprocess, tokenizer, rank, world_size,
                       epoch, skip_batches=0) -> TrainLoader
    DataConfig, DataError (one-line bad-input errors), CorruptDataError

Modules: sources (specs, URL opening), samples (tar -> checked samples, skip accounting),
plan (shard assignment and batch counts), views (paired crops), loader (training).
Evaluation sets (every sample once, all captions, labels) are read by training.evaluation.datasets.
"""
from .loader import DataConfig, TrainLoader, build_train_loader
from .samples import CorruptDataError
from .sources import DataError

__all__ = ["build_train_loader", "DataConfig", "TrainLoader",
           "DataError", "CorruptDataError"]
