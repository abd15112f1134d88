"""Peer check: OpenCLIP's own WebDataset loader (open_clip_train.data.get_wds_dataset, with its
size detection from sizes.json) reads the shards our writer makes, and yields exactly the
samples and captions that are in them."""
from __future__ import annotations

import functools
import json
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch

from tests.helpers.shards import make_synthetic_shards

open_clip_data = pytest.importorskip("open_clip_train.data")

TRAIN, VAL, SAMPLES_PER_SHARD, BATCH = 200, 40, 64, 8
IMAGE_SIZE, CONTEXT = 64, 32


@pytest.fixture(autouse=True)
def open_clip_webdataset_fix(monkeypatch):
    """open_clip_train pins webdataset <= 0.2.86; with 0.2.111 tar_file_expander ends every
    shard with an end-of-file marker that its group_by_keys_nothrow cannot read (KeyError
    'fname'; open_clip issue #935). Its older behaviour is eof_value=None. Patched here only."""
    original = open_clip_data.tar_file_expander
    monkeypatch.setattr(open_clip_data, "tar_file_expander",
                        functools.partial(original, eof_value=None))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("peer"), train=TRAIN, val=VAL,
                                 zeroshot=0, samples_per_shard=SAMPLES_PER_SHARD,
                                 image_size=IMAGE_SIZE)


def captions_in_tars(folder: Path) -> Counter:
    """Every sample's txt member, read with tarfile (independently of any loader)."""
    captions = Counter()
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    captions[tar.extractfile(member).read().decode()] += 1
    return captions


class RecordingTokenizer:
    """open_clip's real tokenizer, remembering every caption the pipeline hands it."""

    def __init__(self):
        self.tokenize = open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT)
        self.seen: list[str] = []

    def __call__(self, text):
        self.seen.append(text)
        return self.tokenize(text)


def open_clip_args(train_data: str | None = None, val_data: str | None = None) -> SimpleNamespace:
    """The fields of open_clip_train's argparse namespace that get_wds_dataset reads."""
    return SimpleNamespace(train_data=train_data, val_data=val_data, train_num_samples=None,
                           val_num_samples=None, dataset_resampled=False,
                           train_data_upsampling_factors=None, seed=0, batch_size=BATCH,
                           world_size=1, workers=0)


def read_all(data_info) -> tuple[int, list[torch.Tensor]]:
    count, tokens = 0, []
    for images, texts in data_info.dataloader:
        assert images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert texts.shape == (images.shape[0], CONTEXT)
        count += images.shape[0]
        tokens.append(texts)
    return count, tokens


def test_size_detection_reads_our_sizes_json(shards):
    total, num_shards = open_clip_data.get_dataset_size(shards["train_shards"])
    assert (total, num_shards) == (TRAIN, 4)  # 64 + 64 + 64 + 8


def test_train_loader_yields_every_sample_once_with_its_caption(shards):
    tokenizer = RecordingTokenizer()
    preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=True)
    data = open_clip_data.get_wds_dataset(open_clip_args(train_data=shards["train_shards"]),
                                          preprocess, is_train=True, tokenizer=tokenizer)
    assert data.dataloader.num_samples == TRAIN  # from sizes.json: 200 = 25 batches of 8
    count, tokens = read_all(data)
    assert count == TRAIN
    assert Counter(tokenizer.seen) == captions_in_tars(shards["train"])
    # the tokens the loader yields are the tokens of exactly those captions
    assert torch.equal(torch.cat(tokens), tokenizer.tokenize(tokenizer.seen))


def test_eval_loader_reads_the_val_split(shards):
    tokenizer = RecordingTokenizer()
    preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=False)
    data = open_clip_data.get_wds_dataset(open_clip_args(val_data=shards["val_shards"]),
                                          preprocess, is_train=False, tokenizer=tokenizer)
    count, _ = read_all(data)
    assert count == VAL
    assert Counter(tokenizer.seen) == captions_in_tars(shards["val"])
    # every val caption is the first of the 5 captions our json member carries
    first_captions = Counter()
    for path in sorted(shards["val"].glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    first_captions[json.loads(tar.extractfile(member).read())["captions"][0]] += 1
    assert first_captions == Counter(tokenizer.seen)
