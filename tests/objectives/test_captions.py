"""K captions per image (data.captions_per_image): the loader's K text rows per image, the
stored teacher's embedding of each chosen caption, exact feature-cached accumulation, and a
trainer run with the new terms, schedules and balancing that resumes exactly."""
import json
import random
import re
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.clip_train_runs import clip_train_runs
from tests.helpers.embeddings import SET_NAME, make_embedding_set
from tests.helpers.trainer import TINY_DISTILL, read_metrics, step_losses, tiny_overrides
from training.accumulation import with_live_micro_batch
from training.checkpoint import tag_for_step
from training.config import load_config
from training.data import build_train_loader
from training.data.loader import choose_captions
from training.data.sidecar import EmbeddingSets
from training.objectives import DistillationLoss
from training.specs import build_teacher, model_spec

K, BATCH = 2, 8


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return make_embedding_set(tmp_path_factory.mktemp("stored"))


def sample_captions(folder: Path) -> dict[str, list[str]]:
    """Every sample's json captions, read straight from the tar files."""
    captions = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    captions[member.name[:-5]] = json.loads(tar.extractfile(member).read())["captions"]
    return captions


def batches(embedded, embeddings=None, skip=0, k=K):
    spec = model_spec("Tiny-ViT-Student")
    cfg = load_config(TINY_DISTILL, tiny_overrides(embedded["train_shards"], "unused", steps=1)
                      + [f"data.captions_per_image={k}"]).data
    loader = build_train_loader(cfg, seed=0, student_preprocess=spec.preprocess_cfg,
                                teacher_preprocess=None, tokenizer=spec.tokenizer, rank=0,
                                world_size=1, epoch=0, skip_batches=skip, embeddings=embeddings)
    return list(loader)


def test_choose_captions_distinct_when_enough_cycled_when_fewer_and_k1_is_rng_choice():
    assert sorted(choose_captions(5, 5, random.Random(0))) == [0, 1, 2, 3, 4]
    fewer = choose_captions(2, 5, random.Random(0))
    assert sorted(set(fewer)) == [0, 1] and fewer[:2] == fewer[2:4] and fewer[4] == fewer[0]
    assert choose_captions(1, 3, random.Random(0)) == [0, 0, 0]
    for seed in range(5):
        items = ["a", "b", "c", "d"]
        assert items[choose_captions(4, 1, random.Random(seed))[0]] == random.Random(seed).choice(items)


def test_the_loader_emits_k_captions_of_each_image_image_major_and_resumes_the_same(embedded):
    captions = sample_captions(Path(embedded["train"]))
    run = batches(embedded)
    for batch in run:
        assert batch["image"].shape[0] == BATCH and batch["text"].shape[0] == K * BATCH
        assert len(batch["caption"]) == K * BATCH
        for i, key in enumerate(batch["key"]):
            chosen = batch["caption"][K * i:K * (i + 1)]
            assert len(set(chosen)) == K and set(chosen) <= set(captions[key])
    resumed = batches(embedded, skip=1)  # a resumed run draws the same captions
    assert [b["caption"] for b in resumed] == [b["caption"] for b in run[1:]]
    assert all(torch.equal(a["text"], b["text"]) for a, b in zip(resumed, run[1:]))


def test_stored_teacher_texts_are_the_embeddings_of_each_chosen_caption(embedded):
    batch = batches(embedded, EmbeddingSets(SET_NAME))[0]
    assert batch["stored_image.0"].shape == (BATCH, 64)
    assert batch["stored_text.0"].shape == (K * BATCH, 64)
    teacher, _ = build_teacher("Tiny-ViT-Teacher", str(embedded["teacher"]))
    with torch.no_grad():
        live = teacher.encode_text(batch["text"], normalize=True)
    torch.testing.assert_close(batch["stored_text.0"], live, atol=1e-5, rtol=0)


def test_feature_cached_accumulation_with_k2_gives_the_full_batch_gradient():
    """Micro-batches of 4 images and 8 captions: image and text rows differ in count."""
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(8, 10, generator=g), torch.randn(16, 10, generator=g)
    towers = torch.nn.Linear(10, 6), torch.nn.Linear(10, 6)
    teacher = {"image_features": F.normalize(torch.randn(8, 6, generator=g), dim=-1),
               "text_features": F.normalize(torch.randn(16, 6, generator=g), dim=-1),
               "logit_scale": torch.tensor(30.0)}
    loss_fn = DistillationLoss(terms={"affinity": {}, "clip": {"weight": 0.5}, "tempkd": {},
                                      "interactive": {}, "feature": {}})

    def student(part):
        return {"image_features": F.normalize(towers[0](images[4 * part:4 * part + 4]), dim=-1),
                "text_features": F.normalize(towers[1](texts[8 * part:8 * part + 8]), dim=-1),
                "logit_scale": torch.tensor(20.0)}

    def grads():
        out = [p.grad.clone() for t in towers for p in t.parameters()]
        for t in towers:
            t.zero_grad(set_to_none=True)
        return out

    full = {"image_features": F.normalize(towers[0](images), dim=-1),
            "text_features": F.normalize(towers[1](texts), dim=-1), "logit_scale": torch.tensor(20.0)}
    loss_fn(full, teacher)["loss"].backward()
    reference = grads()
    with torch.no_grad():
        cached = [student(0), student(1)]
    for index in range(2):
        loss_fn(with_live_micro_batch(cached, student(index), index), teacher)["loss"].backward()
    for a, b in zip(reference, grads()):
        assert torch.allclose(a, b, atol=1e-6)


def train_args(embedded, run_dir, *extra, steps=4) -> list[str]:
    return ["--config", TINY_DISTILL, *tiny_overrides(embedded["train_shards"], run_dir, steps=steps),
            f"model.teacher_pretrained={embedded['teacher']}", "checkpoint.export_at_end=false",
            "optim.grad_accum_steps=2", f"data.captions_per_image={K}", "loss.affinity_weight=null",
            "loss.fixed_logit_scale=null", "loss.balance=loss_ratio",
            "loss.terms.affinity.weight=1.0", "loss.terms.clip.weight={kind: steps, boundaries: [2], values: [0.0, 1.0]}",
            "loss.terms.tempkd.learned=true", "loss.terms.interactive.weight=0.5", *extra]


@pytest.mark.slow
def test_k2_run_with_learned_temperature_and_loss_ratio_balancing_resumes_exactly(embedded, tmp_path):
    """The learned temperature is a task head (the module's state dict), the loss-ratio
    references a checkpoint part: a run resumed at step 2 logs the uninterrupted run's values.
    (Uncertainty weighting's log-variances are a task head like the temperature.)"""
    tag = tmp_path / "full" / "checkpoints" / tag_for_step(2)
    results = clip_train_runs({  # `python -m training` twice, in one process (imports paid once)
        "full": train_args(embedded, tmp_path / "full", "checkpoint.every_steps=2"),
        "resumed": train_args(embedded, tmp_path / "resumed", f"checkpoint.resume={tag}")},
        tmp_path)
    for name, result in results.items():
        assert result["status"] == 0, (name, result["stdout"][-3000:] + result["stderr"][-3000:])
    full = results["full"]
    records = [r for r in read_metrics(tmp_path / "full") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:  # every term and its effective weight, by name, without a hand-kept list
        assert {"affinity", "clip", "tempkd", "interactive", "tempkd_temperature"} <= set(r)
        assert {"weight_affinity", "weight_clip", "weight_tempkd", "weight_interactive"} <= set(r)
    assert [r["weight_clip"] for r in records[:1]] == [0.0] and records[-1]["weight_clip"] > 0
    assert records[0]["tempkd_temperature"] != records[-1]["tempkd_temperature"]  # learned
    clip = step_losses(tmp_path / "full", "clip")  # clip is weighted from step index 2 on:
    assert records[-1]["weight_clip"] == pytest.approx(1.0 / clip[3], rel=1e-5)  # its reference
    assert records[0]["weight_affinity"] == pytest.approx(1.0 / records[0]["affinity"], rel=1e-5)
    console = full["stderr"] + full["stdout"]  # the console line names every term too
    assert re.search(r"step 4/4 \| loss [-\d.]+ (\w+ [-\d.]+ )*tempkd [-\d.]+ .*\| lr", console)
    for key in ("loss", "tempkd", "weight_clip", "tempkd_temperature"):
        expected = {s: v for s, v in step_losses(tmp_path / "full", key).items() if s > 2}
        assert step_losses(tmp_path / "resumed", key) == expected, key
