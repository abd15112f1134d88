"""Zero-shot classification: a text classifier from class names x templates, then top-k accuracy.

Convention (OpenAI CLIP, open_clip, clip_benchmark): each class embedding is the mean of its
normalised template embeddings, renormalised; logits = 100 * image @ classifier. Class names
and templates come from the set's classnames.txt / zeroshot_classification_templates.txt,
from files, or from open_clip.zero_shot_metadata ("imagenet" names, "openai" = the 80
templates, "simple" = open_clip's 7).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from open_clip import zero_shot_metadata

from training.evaluation.features import gather_objects, encode_texts

DEFAULT_TEMPLATES = ("a photo of a {c}.",)
Template = str | Callable[[str], str]


def resolve_classnames(spec: str | None, from_set: list[str] | None) -> list[str]:
    """`spec`: None (the set's classnames.txt), "imagenet", or a text file with one name a line."""
    if spec is None:
        if not from_set:
            raise ValueError("no class names: the set has no classnames.txt; pass --classnames "
                             "FILE or --classnames imagenet")
        return list(from_set)
    if spec == "imagenet":
        return list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    return _lines(spec, "class names")


def resolve_templates(spec: str | None, from_set: list[str] | None) -> list[Template]:
    """`spec`: None (the set's templates, else one "a photo of a {c}."), "openai", "simple", or a file."""
    if spec is None:
        return list(from_set) if from_set else list(DEFAULT_TEMPLATES)
    if spec == "openai":
        return list(zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES)
    templates = _lines(spec, "templates")
    bad = [t for t in templates if "{c}" not in t and "{}" not in t]
    if bad:
        raise ValueError(f"{spec}: template without '{{c}}' (or '{{}}'): {bad[0]!r}")
    return templates


def _lines(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: {what} file not found (or use a built-in name)")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no {what} in the file")
    return lines


def fill(template: Template, classname: str) -> str:
    """A template filled with a class name: "{c}" (clip_benchmark) or "{}" (open_clip) style."""
    return template(classname) if callable(template) else template.format(classname, c=classname)


def build_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[Template],
                     device="cpu", precision: str = "fp32", rank: int = 0, world_size: int = 1
                     ) -> torch.Tensor:
    """[D, C] classifier (fp32, CPU). Distributed: each rank encodes a contiguous block of
    classes and the blocks are gathered, so 1000 classes x 80 templates split across ranks."""
    per_rank = -(-len(classnames) // world_size)
    mine = list(classnames[rank * per_rank:(rank + 1) * per_rank])
    texts = [fill(t, c) for c in mine for t in templates]
    if mine:
        features = encode_texts(model, tokenizer, texts, device, precision)
        block = features.reshape(len(mine), len(templates), -1).mean(1)
        block = block / block.norm(dim=1, keepdim=True)
    else:
        block = torch.empty(0)
    blocks = [b for b in gather_objects(block, world_size) if b.numel()]
    return torch.cat(blocks).T.contiguous()


def zeroshot_metrics(image_features: torch.Tensor, labels: torch.Tensor,
                     classifier: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """top-k accuracies (fractions), mean per-class recall (over classes present), counts."""
    n_classes = classifier.shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}); found {int(labels.min())}.."
                         f"{int(labels.max())} (a set without .cls files, or the wrong class names?)")
    logits = 100.0 * image_features.float() @ classifier.float()
    top = logits.topk(min(max(ks), n_classes), dim=1).indices
    hits = top == labels[:, None]
    metrics = {f"top{k}": float(hits[:, :k].any(1).double().mean()) for k in ks}
    top1_hit = hits[:, 0].double()
    present = labels.unique()
    recalls = torch.stack([top1_hit[labels == c].mean() for c in present])
    metrics["mean_per_class_recall"] = float(recalls.mean())
    metrics["num_images"] = len(labels)
    metrics["num_classes"] = n_classes
    return metrics
