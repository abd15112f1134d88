"""`clip-data embed`: sidecar shards beside the images, resume to identical files, ranks, refusals."""
from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest

from data_tools import embedding
from data_tools.cli import main
from tests.helpers.embeddings import embed_args, make_embedding_set
from tests.helpers.torchrun import run_torchrun
from training.data.samples import read_shard


def digests(folder) -> dict[str, str]:
    """sha256 of every file of a set (shards, manifest.json, sizes.json)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return make_embedding_set(tmp_path_factory.mktemp("embed"))


def test_sidecar_holds_every_sample_with_its_crops_and_captions(embedded):
    manifest = json.loads((embedded["set_dir"] / "manifest.json").read_text())
    info = manifest["embeddings"]
    assert info["augmentations"] == 2 and info["dtype"] == "fp32"
    assert [t["model"] for t in info["teachers"]] == ["Tiny-ViT-Teacher"]
    assert manifest["written"] == embedded["train_count"] == 64
    image_shard = sorted(embedded["train"].glob("*.tar"))[1]
    images = list(read_shard(str(image_shard)))
    sidecar = list(read_shard(str(embedded["set_dir"] / image_shard.name)))
    assert [s["__key__"] for s in sidecar] == [s["__key__"] for s in images]
    for image, stored in zip(images, sidecar):
        captions = json.loads(image["json"])["captions"]
        crops = np.load(io.BytesIO(stored["crops.npy"]))
        img = np.load(io.BytesIO(stored["img0.npy"]))
        txt = np.load(io.BytesIO(stored["txt0.npy"]))
        assert crops.shape == (2, 4) and img.shape == (2, 64) and txt.shape == (len(captions), 64)
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)


def test_interrupted_embed_resumes_to_identical_files(embedded, tmp_path, monkeypatch):
    first = digests(embedded["set_dir"])
    shards = tmp_path / "train"
    shutil.copytree(embedded["train"], shards, ignore=shutil.ignore_patterns("tiny"))
    pattern = str(shards / "shard-{000000..000003}.tar")
    calls = {"n": 0}
    original = embedding.ShardEmbedder._write_chunk

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the second shard (2 chunks of 8 samples x 2 crops per shard)
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(embedding.ShardEmbedder, "_write_chunk", interrupted)
    assert main(embed_args(pattern, embedded["teacher"])) == 130
    assert sorted(p.name for p in (shards / "tiny").glob("*.tar")) == ["shard-000000.tar"]
    assert not list((shards / "tiny").glob(".*.partial"))
    calls["n"] = 100  # no more interruptions
    assert main(embed_args(pattern, embedded["teacher"])) == 0
    assert calls["n"] == 106  # only the three missing shards were computed again
    resumed = digests(shards / "tiny")
    manifest = json.loads((shards / "tiny" / "manifest.json").read_text())
    assert manifest["arguments"].pop("shards") != embedded["train_shards"]
    assert {k: v for k, v in resumed.items() if k != "manifest.json"} == \
        {k: v for k, v in first.items() if k != "manifest.json"}


def test_other_teacher_in_the_same_set_is_refused(embedded, capsys):
    other = embedded["root"] / "other.safetensors"
    from tests.helpers.embeddings import save_teacher
    save_teacher(other, seed=1)
    assert main(embed_args(embedded["train_shards"], other)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other teachers or settings" in err


@pytest.mark.slow
def test_two_ranks_write_the_files_one_process_writes(embedded, tmp_path):
    shards = tmp_path / "ranks"
    shutil.copytree(embedded["train"], shards, ignore=shutil.ignore_patterns("tiny"))
    run_torchrun(["-m", "data_tools", *embed_args(str(shards / "shard-{000000..000003}.tar"),
                                                  embedded["teacher"])], nproc=2)
    two_ranks, one = digests(shards / "tiny"), digests(embedded["set_dir"])
    for result in (two_ranks, one):
        result.pop("manifest.json")  # names its own folder
    assert two_ranks == one and len(one) == 5
