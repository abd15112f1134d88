"""Shared builders for the inheritance tests: small open_clip models with fixed seeds."""
import open_clip
import torch

from training.models import register_model_configs


def model(name: str, seed: int = 0) -> torch.nn.Module:
    """An open_clip model from configs/models (or a built-in name), random weights, eval mode."""
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(name).eval()


def inputs(image_size: int = 64, context: int = 32, n: int = 3, seed: int = 1):
    """Random images and token ids (an end token with the highest id, as the tokenizer makes)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    texts = torch.randint(1, 49000, (n, context), generator=g)
    texts[:, -1] = 49407
    return images, texts
