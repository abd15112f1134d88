"""The evaluation loader: every sample once, unaugmented, captions and labels kept."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
import webdataset as wds

from tests.helpers.data_pipeline import TINY_PREPROCESS, tiny_tokenizer
from tests.helpers.shards import make_synthetic_shards
from training.data import build_eval_loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("synthetic"), train=0, val=40, zeroshot=40,
                                 samples_per_shard=16)


def reference(folder) -> dict[str, dict]:
    """Each sample's json and image, read with plain webdataset and open_clip's val transform."""
    transform = open_clip.image_transform(64, is_train=False)
    samples = {}
    for tar in sorted(folder.glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False).decode("pil"):
            samples[sample["__key__"]] = dict(sample, image=transform(sample["jpg"]))
    return samples


@pytest.mark.parametrize("workers", [0, 2])
def test_zeroshot_set_is_read_once_with_labels(shards, workers):
    loader = build_eval_loader(shards["zeroshot_shards"], TINY_PREPROCESS, tiny_tokenizer(), batch_size=16,
                               workers=workers)
    batches = list(loader)
    expected = reference(shards["zeroshot"])
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(expected) and len(keys) == 40
    assert len(loader) == len(batches)
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            assert batch["label"][i].item() == int(expected[key]["cls"])
            assert batch["captions"][i] == expected[key]["json"]["captions"]
            assert torch.allclose(batch["image"][i], expected[key]["image"], atol=1e-6)
    assert loader.stats()["samples_read"] == 40 and loader.stats()["corrupt_skipped"] == 0


def test_first_caption_only_and_no_labels(shards):
    loader = build_eval_loader(shards["val_shards"], TINY_PREPROCESS, tiny_tokenizer(), batch_size=64,
                               all_captions=False)
    (batch,) = list(loader)
    assert batch["label"] is None and len(batch["key"]) == 40
    assert all(len(captions) == 1 for captions in batch["captions"])
    assert torch.equal(batch["text"], tiny_tokenizer()([c[0] for c in batch["captions"]]))
