"""Paired teacher/student views of one crop, and the caption drawn per sample."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torchvision.transforms.functional as TF
import webdataset as wds

from tests.helpers.data_pipeline import TINY_PREPROCESS, train_loader
from tests.helpers.shards import make_synthetic_shards
from training.data.views import CROP_SCALE, crop_box

TEACHER_96 = {"size": 96, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("synthetic"), train=128, val=0, zeroshot=0)


def first_batch(shards, **kwargs) -> dict:
    cfg = dict(train=shards["train_shards"], batch_size=8, workers=kwargs.pop("workers", 0), seed=5)
    return next(iter(train_loader(cfg, **kwargs)))


@pytest.mark.parametrize("workers", [0, 1])
def test_same_preprocess_gives_the_very_same_tensor(shards, workers):
    batch = first_batch(shards, teacher_preprocess=dict(TINY_PREPROCESS), workers=workers)
    assert batch["teacher_image"] is batch["image"]
    assert batch["image"].shape == (8, 3, 64, 64)


def test_no_teacher_gives_no_teacher_view(shards):
    assert first_batch(shards, teacher_preprocess=None)["teacher_image"] is None


def test_different_preprocess_derives_both_views_from_one_crop(shards):
    batch = first_batch(shards, teacher_preprocess=TEACHER_96)
    teacher, student = batch["teacher_image"], batch["image"]
    assert teacher.shape == (8, 3, 96, 96) and student.shape == (8, 3, 64, 64)
    # Undo the teacher's normalisation, resize to the student's size, apply the student's.
    mean, std = torch.tensor(TEACHER_96["mean"])[:, None, None], torch.tensor(TEACHER_96["std"])[:, None, None]
    crop = teacher * std + mean
    expected = TF.normalize(TF.resize(crop, [64, 64], interpolation=TF.InterpolationMode.BICUBIC, antialias=True),
                            TINY_PREPROCESS["mean"], TINY_PREPROCESS["std"])
    assert torch.allclose(student, expected, atol=1e-5)
    # ... and not just any image: another sample's teacher view does not match.
    assert not torch.allclose(student[0], expected[1], atol=1e-2)


def test_crop_box_draws_torchvision_scale_and_ratio():
    rng = random.Random(0)
    for width, height in [(64, 64), (300, 200), (50, 400)]:
        for _ in range(200):
            top, left, h, w = crop_box(width, height, rng)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            if (width, height) == (64, 64):
                assert CROP_SCALE[0] - 0.05 <= h * w / (width * height) <= CROP_SCALE[1]
                assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_caption_is_drawn_from_the_json_captions_and_seeded(shards):
    captions = {}
    for tar in sorted(shards["train"].glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            captions[sample["__key__"]] = json.loads(sample["json"])["captions"]
    cfg = dict(train=shards["train_shards"], batch_size=16, workers=0, seed=5)

    def chosen(epoch):
        return {k: c for b in train_loader(cfg, epoch=epoch) for k, c in zip(b["key"], b["caption"])}

    epoch0, epoch1 = chosen(0), chosen(1)
    assert epoch0 == chosen(0)
    assert all(caption in captions[key] for key, caption in epoch0.items())
    picked = [captions[key].index(caption) for key, caption in epoch0.items()]
    assert len(set(picked)) == 5  # every one of the 5 captions gets used, not only the first
    assert sum(epoch0[k] != epoch1[k] for k in epoch0) > len(epoch0) / 2
