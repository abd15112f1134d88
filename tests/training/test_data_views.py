"""Paired teacher/student views of one crop, and the caption drawn per sample."""
from __future__ import annotations

import json
import random

import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
import webdataset as wds

from tests.helpers.data_pipeline import TINY_PREPROCESS, tiny_tokenizer, train_loader
from tests.helpers.shards import make_synthetic_shards
from training.data import DataConfig
from training.data.views import CROP_SCALE, crop_box

TEACHER_96 = {"size": 96, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("synthetic"), train=128, val=0, zeroshot=0)


def first_batch(shards, **kwargs) -> dict:
    cfg = DataConfig(train=shards["train_shards"], batch_size=8, workers=kwargs.pop("workers", 0))
    return next(iter(train_loader(cfg, seed=5, **kwargs)))


@pytest.mark.parametrize("workers", [0, 1])
def test_same_preprocess_gives_the_very_same_tensor(shards, workers):
    batch = first_batch(shards, teacher_preprocess=dict(TINY_PREPROCESS), workers=workers)
    assert batch["teacher_image"] is batch["image"]
    assert batch["image"].shape == (8, 3, 64, 64)


def test_no_teacher_gives_no_teacher_view(shards):
    batch = first_batch(shards, teacher_preprocess=None)
    assert batch["teacher_image"] is None and batch["teacher_text"] is batch["text"]


@pytest.mark.parametrize("workers", [0, 1])
def test_teacher_tokenizer_gives_the_teacher_its_own_ids(shards, workers):
    teacher_tokenizer = open_clip.SimpleTokenizer(context_length=16)  # the student's: 32
    batch = first_batch(shards, teacher_tokenizer=teacher_tokenizer, workers=workers)
    student_ids, teacher_ids = tiny_tokenizer()(batch["caption"]), teacher_tokenizer(batch["caption"])
    assert student_ids.shape == (8, 32) and teacher_ids.shape == (8, 16)
    assert torch.equal(batch["text"], student_ids)
    assert torch.equal(batch["teacher_text"], teacher_ids)
    assert len(batch["caption"]) == 8 and all(isinstance(c, str) and c for c in batch["caption"])


@pytest.mark.parametrize("workers", [0, 1])
def test_no_teacher_tokenizer_gives_the_very_same_text_tensor(shards, workers):
    batch = first_batch(shards, teacher_preprocess=TEACHER_96, workers=workers)
    assert batch["teacher_text"] is batch["text"]
    assert torch.equal(batch["text"], tiny_tokenizer()(batch["caption"]))
    assert batch["teacher_image"] is not batch["image"]  # only the equal view is aliased


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
    cfg = DataConfig(train=shards["train_shards"], batch_size=16, workers=0)

    def chosen(epoch):
        return {k: c for b in train_loader(cfg, seed=5, epoch=epoch) for k, c in zip(b["key"], b["caption"])}

    epoch0, epoch1 = chosen(0), chosen(1)
    assert epoch0 == chosen(0)
    assert all(caption in captions[key] for key, caption in epoch0.items())
    picked = [captions[key].index(caption) for key, caption in epoch0.items()]
    assert len(set(picked)) == 5  # every one of the 5 captions gets used, not only the first
    assert sum(epoch0[k] != epoch1[k] for k in epoch0) > len(epoch0) / 2
