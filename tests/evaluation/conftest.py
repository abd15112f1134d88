"""Evaluation sets and a tiny model shared by the tests of this folder (built once per session)."""
import pytest

from tests.helpers.evaluation import (make_caption_shards, make_imagefolder,
                                      make_labelled_shards, tiny_model)


@pytest.fixture(scope="session")
def eval_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    return {"zeroshot": make_labelled_shards(root / "zeroshot"),
            "val": make_caption_shards(root / "val"),
            "val1": make_caption_shards(root / "val1", captions_per_image=1),
            "imagefolder": make_imagefolder(root / "imagefolder")}


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def spec():
    """The spec of `model`: its tokenizer and preprocessing (the one source of both)."""
    from training.specs import model_spec
    return model_spec("Tiny-ViT-Student")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A real short run: the trainer (plain CLIP, Tiny-ViT-Teacher) on 2 torchrun ranks with
    periodic evaluation every 4 steps and at the end (8 steps); checkpoints, export, metrics."""
    from tests.helpers.shards import make_synthetic_shards
    from tests.helpers.torchrun import run_torchrun

    root = tmp_path_factory.mktemp("trained")
    data = make_synthetic_shards(root / "data", train=128, val=32, zeroshot=34,
                                 samples_per_shard=16)
    run_dir = root / "run"
    run_torchrun(["-m", "training", "--config", "configs/tiny-clip.yaml",
                  f"data.train={data['train_shards']}", f"run_dir={run_dir}",
                  "optim.epochs=1", "data.batch_size=8", "data.workers=0", "log.every_steps=2",
                  "checkpoint.every_steps=4", "eval.every_steps=4", f"eval.val={data['val']}",
                  f"eval.zeroshot={data['zeroshot']}", "eval.batch_size=5"], nproc=2, timeout=400)
    return {"run_dir": run_dir, **data}
