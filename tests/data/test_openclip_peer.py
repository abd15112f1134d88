"""Peer check: OpenCLIP's own WebDataset loader (open_clip_train.data.get_wds_dataset, with its
size detection from sizes.json) reads the shards our writer makes, and yields exactly the
samples and captions that are in them; and OpenCLIP's unmodified trainer
(`python -m open_clip_train.main --dataset-type webdataset`) trains one epoch on our shards and on
img2dataset's, in the environment requirements.lock builds (webdataset 0.2.86: see
requirements.txt). Nothing of open_clip_train is patched here."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch

from tests.helpers.http_server import ImageServer, image_route
from tests.helpers.shards import make_synthetic_shards

open_clip_data = pytest.importorskip("open_clip_train.data")

TRAIN, VAL, SAMPLES_PER_SHARD, BATCH = 200, 40, 64, 8
IMAGE_SIZE, CONTEXT = 64, 32


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


# ---------------------------------------------------------------- OpenCLIP's own trainer

STUDENT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "models" / "Tiny-ViT-Student.json"
TRAINER_BATCH = 40


def train_one_epoch_with_open_clip(work: Path, train_data: str, num_samples: int | None,
                                   batch_size: int) -> tuple[str, Path]:
    """`python -m open_clip_train.main`, unmodified, one epoch on CPU. The tiny model reaches it
    through open_clip's own `local-dir:` model schema (a folder holding open_clip_config.json),
    so nothing is registered or patched in its process. Returns (its log, its epoch checkpoint)."""
    model_dir = work / "model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": json.loads(STUDENT_CONFIG.read_text())}))
    command = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset",
               "--train-data", train_data, "--model", f"local-dir:{model_dir}",
               "--device", "cpu", "--precision", "fp32", "--epochs", "1",
               "--batch-size", str(batch_size), "--workers", "0", "--warmup", "1",
               "--logs", str(work / "logs"), "--name", "peer", "--report-to", "none",
               "--seed", "0"]
    if num_samples is not None:
        command += ["--train-num-samples", str(num_samples)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output, work / "logs" / "peer" / "checkpoints" / "epoch_1.pt"


def assert_one_full_epoch(output: str, checkpoint: Path, samples: int) -> None:
    assert "KeyError" not in output
    # open_clip_train logs the last step of the epoch as "[seen/planned (100%)]"
    assert re.search(rf"Train Epoch: 0 \[{samples}/{samples} \(100%\)\]", output), output[-3000:]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


@pytest.mark.slow  # one open_clip_train process: about 20 s
def test_open_clip_trainer_trains_one_epoch_on_our_shards(shards, tmp_path):
    output, checkpoint = train_one_epoch_with_open_clip(
        tmp_path, shards["train_shards"], None, TRAINER_BATCH)  # size from our sizes.json
    assert_one_full_epoch(output, checkpoint, TRAIN)


IMG2DATASET_IMAGES, IMG2DATASET_PER_SHARD = 12, 8


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory):
    """img2dataset itself (not our laion wrapper) downloads 12 images from a server on 127.0.0.1
    into its own webdataset layout: 00000.tar (8 samples) and 00001.tar (4), no sizes.json."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    work = tmp_path_factory.mktemp("img2dataset")
    routes = {f"/{i}.jpg": image_route(80 + i, 72, seed=i) for i in range(IMG2DATASET_IMAGES)}
    with ImageServer(routes) as server:
        url_list = work / "urls.csv"
        url_list.write_text("url,caption\n" + "".join(
            f"{server.url(path)},picture number {i}\n" for i, path in enumerate(routes)))
        img2dataset.download(url_list=str(url_list), input_format="csv", url_col="url",
                             caption_col="caption", output_format="webdataset",
                             output_folder=str(work / "out"), image_size=IMAGE_SIZE,
                             resize_mode="center_crop", processes_count=1, thread_count=4,
                             number_sample_per_shard=IMG2DATASET_PER_SHARD, enable_wandb=False,
                             disallowed_header_directives=[])
    out = work / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert sum(captions_in_tars(out).values()) == IMG2DATASET_IMAGES
    return out


@pytest.mark.slow  # img2dataset (spawns a process) + one open_clip_train process: about 30 s
def test_open_clip_trainer_trains_one_epoch_on_img2dataset_shards(img2dataset_shards, tmp_path):
    batch = 4
    output, checkpoint = train_one_epoch_with_open_clip(
        tmp_path, str(img2dataset_shards / "{00000..00001}.tar"), IMG2DATASET_IMAGES, batch)
    assert_one_full_epoch(output, checkpoint, IMG2DATASET_IMAGES)
