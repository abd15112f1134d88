"""Image-text retrieval metrics with several captions per image (Karpathy COCO / Flickr style).

A text's rank is the number of images that score strictly higher than its own image; an
image's rank is the number of texts that score strictly higher than its best-scoring caption,
so a hit at k means "any positive in the top k" (the field's convention). Metric names and
rank conventions (1-based median rank floored, mean rank) are open_clip_train's
`get_clip_metrics`, to which this reduces with one caption per image. Ties count in the
model's favour (no arbitrary sort order), which only matters for exactly equal scores.
"""
from __future__ import annotations

import torch

RECALL_KS = (1, 5, 10)


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor,
                    text_to_image: torch.Tensor, chunk: int = 1024
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based (image->text ranks [N], text->image ranks [T]); similarities in `chunk` blocks."""
    n_images, n_texts = len(image_features), len(text_features)
    if n_texts == 0 or n_images == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if int(text_to_image.max()) >= n_images or int(text_to_image.min()) < 0:
        raise ValueError("text_to_image points outside the image features")
    img, txt = image_features.float(), text_features.float()

    t2i = torch.empty(n_texts, dtype=torch.long)
    for start in range(0, n_texts, chunk):
        sim = txt[start:start + chunk] @ img.T                          # [t, N]
        own = sim.gather(1, text_to_image[start:start + chunk, None])    # [t, 1]
        t2i[start:start + chunk] = (sim > own).sum(1)

    i2t = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk):
        sim = img[start:start + chunk] @ txt.T                           # [n, T]
        rows = torch.arange(start, start + len(sim))
        is_positive = text_to_image[None, :] == rows[:, None]
        best = sim.masked_fill(~is_positive, float("-inf")).max(1, keepdim=True).values
        i2t[start:start + len(sim)] = (sim > best).sum(1)
        if torch.isinf(best).any():
            missing = int(rows[torch.isinf(best[:, 0])][0])
            raise ValueError(f"image {missing} has no caption")
    return i2t, t2i


def rank_summary(ranks: torch.Tensor, prefix: str, ks=RECALL_KS) -> dict[str, float]:
    """R@k, median rank and mean rank (1-based) of 0-based `ranks`."""
    ranks = ranks.double()
    metrics = {f"{prefix}_R@{k}": float((ranks < k).double().mean()) for k in ks}
    metrics[f"{prefix}_median_rank"] = float(torch.floor(torch.quantile(ranks, 0.5))) + 1
    metrics[f"{prefix}_mean_rank"] = float(ranks.mean()) + 1
    return metrics


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor, ks=RECALL_KS) -> dict[str, float]:
    """image_to_text_* and text_to_image_* recalls (fractions) and ranks, plus counts."""
    i2t, t2i = retrieval_ranks(image_features, text_features, text_to_image)
    return {**rank_summary(i2t, "image_to_text", ks), **rank_summary(t2i, "text_to_image", ks),
            "num_images": len(image_features), "num_texts": len(text_features)}
