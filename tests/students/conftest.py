"""One launch of tests/students/students_worker.py (2 ranks, the tiny KDEOV recipe) shared by
the tests of this folder, the teacher weights file every worker distils from, and the launcher
the workers share (`launch_worker`)."""
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


def launch_worker(worker: str, root, teacher_file, **sizes) -> dict:
    """Synthetic shards under `root`, then `worker` on 2 torchrun ranks with --shards, --val,
    --zeroshot, --teacher and --out ROOT/out; returns the shard set's dict plus "out"."""
    from tests.helpers.shards import make_synthetic_shards
    from tests.helpers.torchrun import run_torchrun

    data = make_synthetic_shards(root / "data", samples_per_shard=32, **sizes)
    out = root / "out"
    out.mkdir()
    run_torchrun([worker, "--shards", data["train_shards"], "--zeroshot", str(data["zeroshot"]),
                  "--val", str(data["val"]), "--teacher", str(teacher_file), "--out", str(out)],
                 nproc=2, timeout=900)
    return {**data, "out": out}


@pytest.fixture(scope="package")
def students(tmp_path_factory, teacher_file):
    data = launch_worker("tests/students/students_worker.py", tmp_path_factory.mktemp("students"),
                         teacher_file, train=64, val=24, zeroshot=30)
    ranks = [json.loads((data["out"] / f"rank{r}.json").read_text()) for r in range(2)]
    return {**data, "ranks": ranks, "teacher": teacher_file}
