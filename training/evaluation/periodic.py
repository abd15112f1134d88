"""The trainer's periodic evaluation:
`run_periodic_eval(model, eval_cfg, dist_info, *, tokenizer, preprocess_cfg)`.

Arguments
- model: the student being trained: an open_clip CLIP model or a wrapper holding it as
  `.module` (DeepSpeed engine at any ZeRO stage (ZeRO-3 parameters are gathered whole for the
  evaluation), DDP). It is switched to eval mode for the evaluation and back to its previous
  mode afterwards; no gradient is kept. Images are cast to its weights' dtype (bf16 engines).
- eval_cfg: `training.config.EvalConfig` (or any object / mapping with the same keys):
  `val` (captioned shards: retrieval), `zeroshot` (labelled shards with classnames.txt and
  optionally zeroshot_classification_templates.txt, or an ImageFolder tree: zero-shot),
  `batch_size`, `max_samples` (None: whole set; else the first N samples in shard order,
  the same N on any number of ranks). Optional extras: `precision` ("fp32" default, "bf16",
  "fp16" on GPU), `workers` (loader workers per rank, default 0).
- dist_info: `training.distributed.DistInfo` (uses `rank`, `world_size`, `device`), or None
  for a single process on the model's device.
- tokenizer (keyword, required): the model's own tokenizer, from its spec
  (`training.specs.model_spec(...).tokenizer`; the trainer passes its student spec's).
- preprocess_cfg (keyword, required): the model spec's `preprocess_cfg` (open_clip's
  size / mean / std / interpolation / resize_mode / fill_color); the images go through
  open_clip's eval transform for it (`suite.eval_transform`).

Collective: every rank must call it. Returns the same dict on every rank:
`zeroshot/top1`, `zeroshot/top5`, `zeroshot/mean_per_class_recall`,
`val/image_to_text_R@1|5|10`, `val/text_to_image_R@1|5|10`, `val/*_median_rank`,
`val/*_mean_rank` (fractions and 1-based ranks), only for the sets configured. The trainer's
MetricsLogger.log_eval writes them to metrics.jsonl as `eval/<key>`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from training.evaluation.features import full_parameters, unwrap_model
from training.evaluation.suite import eval_transform, run_retrieval, run_zeroshot

REPORTED = ("top1", "top5", "mean_per_class_recall", "image_to_text_R@1", "image_to_text_R@5",
            "image_to_text_R@10", "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10",
            "image_to_text_median_rank", "text_to_image_median_rank",
            "image_to_text_mean_rank", "text_to_image_mean_rank")


def _get(cfg: Any, key: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def run_periodic_eval(model, eval_cfg, dist_info=None, *, tokenizer: Callable,
                      preprocess_cfg: Mapping) -> dict[str, float]:
    """Evaluate on the configured sets; see the module docstring for the arguments."""
    open_clip_model = unwrap_model(model)
    device = next(open_clip_model.parameters()).device
    rank, world_size = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    common = dict(
        tokenizer=tokenizer, transform=eval_transform(preprocess_cfg),
        device=device, precision=_get(eval_cfg, "precision", "fp32"),
        batch_size=_get(eval_cfg, "batch_size", 64), workers=_get(eval_cfg, "workers", 0),
        rank=rank, world_size=world_size, max_samples=_get(eval_cfg, "max_samples"))
    results: dict[str, float] = {}
    with full_parameters(open_clip_model):
        if _get(eval_cfg, "zeroshot"):
            metrics = run_zeroshot(open_clip_model, _get(eval_cfg, "zeroshot"), **common)
            results.update({f"zeroshot/{k}": float(metrics[k]) for k in REPORTED if k in metrics})
        if _get(eval_cfg, "val"):
            metrics = run_retrieval(open_clip_model, _get(eval_cfg, "val"), **common)
            results.update({f"val/{k}": float(metrics[k]) for k in REPORTED if k in metrics})
    return results
