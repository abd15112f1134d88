"""Shards with a stored teacher embedding set (`clip-data embed`) for tests.

    paths = make_embedding_set(tmp_path)      # 64 samples in 4 shards, set "tiny", fp32, N=2
    paths["train_shards"], paths["teacher"], paths["set_dir"]

The teacher is Tiny-ViT-Teacher with seeded random weights saved to a safetensors file, so a live
run and the embed step load the very same weights.
"""
from __future__ import annotations

from pathlib import Path

from tests.helpers.shards import make_synthetic_shards

TEACHER = "Tiny-ViT-Teacher"
SET_NAME = "tiny"


def save_teacher(path: Path, seed: int = 0) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from training import models

    models.register_model_configs()
    torch.manual_seed(seed)
    save_file(open_clip.create_model(TEACHER).state_dict(), str(path))
    return path


def embed_args(train_shards: str, teacher: Path, *extra: str, name: str = SET_NAME,
               augmentations: int = 2, dtype: str = "fp32") -> list[str]:
    return ["embed", train_shards, "--name", name, "--teacher", TEACHER, "--pretrained",
            str(teacher), "--augmentations", str(augmentations), "--dtype", dtype,
            "--batch-size", "16", "--device", "cpu", "--no-progress", *extra]


def make_embedding_set(root, train: int = 64, samples_per_shard: int = 16, **embed) -> dict:
    from data_tools.cli import main

    root = Path(root)
    paths = make_synthetic_shards(root / "shards", train=train, val=0, zeroshot=0,
                                  samples_per_shard=samples_per_shard)
    paths["teacher"] = save_teacher(root / "teacher.safetensors")
    assert main(embed_args(paths["train_shards"], paths["teacher"], **embed)) == 0
    paths["set_dir"] = paths["train"] / embed.get("name", SET_NAME)
    return paths
