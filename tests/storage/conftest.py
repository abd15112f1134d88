"""One S3 server (moto, tests/helpers/s3.py) for the storage tests, with a bucket `shards` and the
synthetic shard set uploaded to s3://shards/train (shards + sizes.json), val/ and zeroshot/;
AWS_* variables point every client (this process and its subprocesses) at it."""
from __future__ import annotations

import os

import pytest

from tests.helpers.s3 import S3Server, s3_filesystem, upload_folder
from tests.helpers.shards import make_synthetic_shards

BUCKET = "shards"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    saved = dict(os.environ)
    with S3Server() as server:
        os.environ.update(server.env)
        s3_filesystem().mkdir(BUCKET)
        yield server
    os.environ.clear()
    os.environ.update(saved)
    s3_filesystem()  # drop the cached clients of this server


@pytest.fixture(scope="session")
def s3_shards(s3, tmp_path_factory):
    """The local shard set and its copy in the bucket: {"local": make_synthetic_shards(...),
    "train": spec, "val": url, "zeroshot": url}."""
    local = make_synthetic_shards(tmp_path_factory.mktemp("s3-local"), train=128, val=24, zeroshot=20,
                                  samples_per_shard=16)
    fs = s3_filesystem()
    urls = {name: upload_folder(fs, local[name], f"s3://{BUCKET}/{name}")
            for name in ("train", "val", "zeroshot")}
    pattern = local["train_shards"].rsplit("/", 1)[1]
    return {"local": local, "train": f"{urls['train']}/{pattern}", "val": urls["val"],
            "zeroshot": urls["zeroshot"]}


@pytest.fixture(autouse=True)
def no_faults(request):
    """Every test that uses the server starts with a well-behaved one."""
    if "s3" in request.fixturenames:
        request.getfixturevalue("s3").faults()
