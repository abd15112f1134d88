"""Training data: WebDataset shards streamed into batches of paired teacher/student views.

Public API (docs/data-pipeline.md):
    build_train_loader(cfg, *, student_preprocess, teacher_preprocess, tokenizer, rank, world_size,
                       epoch, skip_batches=0) -> TrainLoader
    build_eval_loader(path_spec, preprocess, tokenizer, batch_size, all_captions=True, workers=0)
        -> EvalLoader
    DataConfig, DataError (one-line bad-input errors), CorruptDataError

Modules: sources (specs, URL opening), samples (tar -> checked samples, skip accounting),
plan (shard assignment and batch counts), views (paired crops), loader (training), eval.
"""
from .eval import EvalLoader, build_eval_loader
from .loader import DataConfig, TrainLoader, build_train_loader
from .samples import CorruptDataError
from .sources import DataError

__all__ = ["build_train_loader", "build_eval_loader", "DataConfig", "TrainLoader", "EvalLoader",
           "DataError", "CorruptDataError"]
