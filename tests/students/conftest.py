"""One launch of tests/students/students_worker.py (2 ranks, the tiny KDEOV recipe) shared by
the tests of this folder, plus the teacher weights file it distils from."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="package")
def teacher_file(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from training.specs import model_spec

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(model_spec("Tiny-ViT-Teacher").build().state_dict(), str(path))
    return path


@pytest.fixture(scope="package")
def students(tmp_path_factory, teacher_file):
    from tests.helpers.shards import make_synthetic_shards
    from tests.helpers.torchrun import run_torchrun

    root = tmp_path_factory.mktemp("students")
    data = make_synthetic_shards(root / "data", train=64, val=24, zeroshot=30,
                                 samples_per_shard=32)
    out = root / "out"
    out.mkdir()
    run_torchrun(["tests/students/students_worker.py", "--shards", data["train_shards"],
                  "--zeroshot", str(data["zeroshot"]), "--val", str(data["val"]),
                  "--teacher", str(teacher_file), "--out", str(out)], nproc=2, timeout=900)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {**data, "out": out, "ranks": ranks, "teacher": teacher_file}
