"""One evaluation task end to end: a model and a set's path -> a metrics dict.

Shared by `clip-eval` and the trainer's periodic evaluation, so both give the same numbers.
Every rank calls these functions (collectives inside); every rank gets the same result.
"""
from __future__ import annotations

from typing import Callable, Mapping

from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from training.evaluation.datasets import build_eval_loader, open_eval_set
from training.evaluation.features import EvalFeatures, encode_loader
from training.evaluation.retrieval import retrieval_metrics
from training.evaluation.zeroshot import (build_classifier, resolve_classnames,
                                          resolve_templates, zeroshot_metrics)


def eval_transform(preprocess_cfg: Mapping) -> Callable:
    """open_clip's eval transform for a model spec's `preprocess_cfg` (size, mean, std,
    interpolation, resize_mode, fill_color; open_clip's defaults for keys left out)."""
    cfg = merge_preprocess_dict(PreprocessCfg(), dict(preprocess_cfg))
    for key in ("size", "mean", "std"):  # JSON lists -> the tuples open_clip expects
        if isinstance(cfg[key], list):
            cfg[key] = tuple(cfg[key])
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def _features(model, eval_set, *, transform, tokenizer, device, precision, batch_size, workers,
              rank, world_size, max_samples) -> EvalFeatures:
    loader = build_eval_loader(eval_set, transform, batch_size, workers, rank, world_size,
                               max_samples)
    return encode_loader(model, loader, device, precision, tokenizer, rank, world_size)


def run_zeroshot(model, path, *, tokenizer, transform, device="cpu", precision="fp32",
                 batch_size=64, workers=0, rank=0, world_size=1, max_samples=None,
                 classnames: str | None = None, templates: str | None = None) -> dict:
    """Zero-shot top-1/top-5/mean per-class recall on a labelled set (shards or ImageFolder)."""
    eval_set = open_eval_set(path)
    names = resolve_classnames(classnames, eval_set.classnames)
    prompts = resolve_templates(templates, eval_set.templates)
    classifier = build_classifier(model, tokenizer, names, prompts, device, precision,
                                  rank, world_size)
    features = _features(model, eval_set, transform=transform, tokenizer=None, device=device,
                         precision=precision, batch_size=batch_size, workers=workers,
                         rank=rank, world_size=world_size, max_samples=max_samples)
    metrics = zeroshot_metrics(features.image_features, features.labels, classifier)
    metrics["num_templates"] = len(prompts)
    return {**metrics, **{f"skipped/{k}": v for k, v in features.skipped.items()}}


def run_retrieval(model, path, *, tokenizer, transform, device="cpu", precision="fp32",
                  batch_size=64, workers=0, rank=0, world_size=1, max_samples=None) -> dict:
    """i2t / t2i R@1/5/10, median and mean rank on a captioned set (all captions per image)."""
    features = _features(model, open_eval_set(path), transform=transform, tokenizer=tokenizer,
                         device=device, precision=precision, batch_size=batch_size,
                         workers=workers, rank=rank, world_size=world_size,
                         max_samples=max_samples)
    metrics = retrieval_metrics(features.image_features, features.text_features,
                                features.text_to_image)
    return {**metrics, **{f"skipped/{k}": v for k, v in features.skipped.items()}}
