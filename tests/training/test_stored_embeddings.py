"""Distilling from embeddings stored beside the shards (model.teacher_source=shards).

The reference is the live teacher on the same stored augmentations (model.teacher_embeddings with
the live source: the loader re-applies the set's crops and picks the same captions), so the only
difference between the two runs is where the teacher's outputs come from.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.clip_train_runs import clip_train_runs
from tests.helpers.embeddings import SET_NAME, make_embedding_set, save_teacher
from tests.helpers.trainer import TINY_DISTILL, step_losses, tiny_overrides
from training.checkpoint import tag_for_step
from training.config import load_config
from training.data import DataError, build_train_loader
from training.data.sidecar import EmbeddingSets
from training.objectives import DistillationLoss
from training.specs import build_teacher, model_spec
from training.teachers import build_teacher_source


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return make_embedding_set(tmp_path_factory.mktemp("stored"))


def train_args(embedded, run_dir, *extra, steps=3) -> list[str]:
    """`python -m training` arguments of a short run on the embedded shards."""
    return ["--config", TINY_DISTILL,
            *tiny_overrides(embedded["train_shards"], run_dir, steps=steps),
            f"model.teacher_pretrained={embedded['teacher']}", "checkpoint.export_at_end=false",
            "optim.grad_accum_steps=2", *extra]


def stored(name=SET_NAME):
    return ["model.teacher_source=shards", f"model.teacher_embeddings={name}"]


@pytest.mark.slow
def test_stored_embeddings_give_the_live_teachers_losses_and_resume_exactly(embedded, tmp_path):
    # Three `python -m training` runs in order in one process (the imports paid once): the live
    # teacher, the stored set, and the stored run resumed at step 2 in a new run folder.
    tag = tmp_path / "stored" / "checkpoints" / tag_for_step(2)
    plan = {"live": train_args(embedded, tmp_path / "live", f"model.teacher_embeddings={SET_NAME}",
                               steps=4),
            "stored": train_args(embedded, tmp_path / "stored", *stored(),
                                 "checkpoint.every_steps=2", steps=4),
            "resumed": train_args(embedded, tmp_path / "resumed", *stored(),
                                  f"checkpoint.resume={tag}", steps=4)}
    for name, result in clip_train_runs(plan, tmp_path).items():
        assert result["status"] == 0, (name, result["stdout"][-2000:] + result["stderr"][-2000:])
    live_losses, stored_losses = step_losses(tmp_path / "live"), step_losses(tmp_path / "stored")
    assert sorted(stored_losses) == [1, 2, 3, 4]
    for step, loss in live_losses.items():
        assert abs(stored_losses[step] - loss) < 1e-5, (step, loss, stored_losses[step])
    # Resumed at step 2 (a new run folder), the stored crops and captions drawn are the same.
    assert step_losses(tmp_path / "resumed") == {3: stored_losses[3], 4: stored_losses[4]}


def config(embedded, *extra):
    return load_config(TINY_DISTILL, tiny_overrides(embedded["train_shards"], "unused", steps=1)
                       + [f"model.teacher_pretrained={embedded['teacher']}", *extra])


def first_batch(embedded, embeddings):
    spec = model_spec("Tiny-ViT-Student")
    loader = build_train_loader(config(embedded).data, seed=0, student_preprocess=spec.preprocess_cfg,
                                teacher_preprocess=None, tokenizer=spec.tokenizer, rank=0,
                                world_size=1, epoch=0, embeddings=embeddings)
    return next(iter(loader))


def test_the_loader_re_applies_stored_crops_with_the_captions_embeddings(embedded):
    batch = first_batch(embedded, EmbeddingSets(SET_NAME))
    fresh = first_batch(embedded, None)
    assert batch["key"] == fresh["key"]  # same samples, ...
    assert not torch.equal(batch["image"], fresh["image"])  # ... the stored crops, not new ones
    assert batch["stored_image.0"].shape == batch["stored_text.0"].shape == (8, 64)
    # The text embedding is the one of the caption the student reads: the live teacher's.
    teacher, _ = build_teacher("Tiny-ViT-Teacher", str(embedded["teacher"]))
    with torch.no_grad():
        live = teacher.encode_text(batch["text"], normalize=True)
        image = teacher.encode_image(batch["image"], normalize=True)
    torch.testing.assert_close(batch["stored_text.0"], live, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["stored_image.0"], image, atol=1e-5, rtol=0)


def copy_set(embedded, name) -> Path:
    target = embedded["train"] / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(embedded["set_dir"], target)
    return target


def source_error(embedded, *extra) -> str:
    with pytest.raises(ValueError) as err:
        build_teacher_source(config(embedded, *extra).model, torch.device("cpu"),
                             config(embedded, *extra).data)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_mismatched_or_incomplete_sets_are_refused_before_training(embedded, tmp_path):
    """The teacher source's checks (a ValueError: the CLI's one line, exit 2, before any step)."""
    other = save_teacher(tmp_path / "other.safetensors", seed=1)
    assert "teacher 0 weights_sha256" in source_error(embedded, *stored(),
                                                      f"model.teacher_pretrained={other}")

    folder = copy_set(embedded, "preprocess")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["embeddings"]["teachers"][0]["preprocess"]["mean"][0] = 0.5
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "teacher 0 preprocess" in source_error(embedded, *stored("preprocess"))
    assert "holds 1 teacher(s), the config names 2" in source_error(
        embedded, *stored(), "model.ensemble=[{model: Tiny-ViT-Teacher}]")

    folder = copy_set(embedded, "lacking")
    (folder / "shard-000002.tar").unlink()
    assert "lacking/shard-000002.tar: missing" in source_error(embedded, *stored("lacking"))
    message = source_error(embedded, *stored("nonexistent"))
    assert "no embedding set" in message and "nonexistent" in message


def test_a_sidecar_changed_after_embed_is_refused_before_its_samples_are_used(embedded):
    folder = copy_set(embedded, "tampered")
    for shard in folder.glob("*.tar"):  # same size, other bytes
        data = bytearray(shard.read_bytes())
        data[1024] ^= 1
        shard.write_bytes(bytes(data))
    build_teacher_source(config(embedded, *stored("tampered")).model, torch.device("cpu"),
                         config(embedded, *stored("tampered")).data)  # sizes agree: accepted
    with pytest.raises(DataError, match="sha256 differs from its manifest.json"):
        first_batch(embedded, EmbeddingSets("tampered"))


def test_ensemble_averages_probabilities_after_the_softmax():
    generator = torch.Generator().manual_seed(0)
    unit = lambda: torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    student = {"image_features": unit(), "text_features": unit(), "logit_scale": torch.tensor(10.)}
    a = {"image_features": unit(), "text_features": unit(), "logit_scale": torch.tensor(70.)}
    b = {"image_features": unit(), "text_features": unit(), "logit_scale": torch.tensor(60.)}
    loss = DistillationLoss(affinity_weight=1.0)
    got = loss(student, {"ensemble": [a, b]})["affinity"]
    s_i2t = 10 * student["image_features"] @ student["text_features"].T
    expected = 0
    for s_logits, kind in ((s_i2t, "i2t"), (s_i2t.T, "t2i")):
        probs = sum((t["logit_scale"] * (t["image_features"] @ t["text_features"].T
                                         if kind == "i2t" else t["text_features"] @ t["image_features"].T)
                     ).softmax(-1) for t in (a, b)) / 2
        expected += -(probs * s_logits.log_softmax(-1)).sum(-1).mean() / 2
    assert torch.allclose(got, expected, atol=1e-6)
    # One member is the single-teacher loss; averaging logits instead would differ.
    assert torch.allclose(loss(student, {"ensemble": [a]})["affinity"], loss(student, a)["affinity"])
    scales = loss(student, {"ensemble": [a, b]})  # the scales applied come with the terms
    assert scales["teacher_logit_scale.0"] == 70 and scales["teacher_logit_scale.1"] == 60


@pytest.mark.slow
def test_sidecar_shards_are_read_once_however_many_shards_the_plan_reads_side_by_side(
        tmp_path, monkeypatch):
    """8 lanes through shuffle windows of 3 samples over shards of 2 (up to 2 shards each): 16
    shards read side by side, more than the 8 sidecar shards the join used to keep."""
    from training.data.config import DataConfig
    from training.data.sidecar import SidecarJoin

    paths = make_embedding_set(tmp_path, train=128, samples_per_shard=2, augmentations=1)
    spec = model_spec("Tiny-ViT-Student")
    cfg = DataConfig(train=paths["train_shards"], batch_size=8, workers=0, shuffle_buffer=3)
    loads = []
    load = SidecarJoin._load
    monkeypatch.setattr(SidecarJoin, "_load", lambda self, url: loads.append(url) or load(self, url))

    def epoch(side_by_side=None):
        loader = build_train_loader(cfg, seed=0, student_preprocess=spec.preprocess_cfg,
                                    teacher_preprocess=None, tokenizer=spec.tokenizer, rank=0,
                                    world_size=1, epoch=0, lanes=8,
                                    embeddings=EmbeddingSets(SET_NAME))
        if side_by_side is not None:
            monkeypatch.setattr(type(loader.plan), "shards_side_by_side", lambda plan: side_by_side)
        loads.clear()
        keys = [key for batch in loader for key in batch["key"]]
        return loader.plan, keys

    plan, keys = epoch()
    assert plan.shards_side_by_side() == 16 and len(keys) == len(set(keys)) == 128
    assert sorted(loads) == sorted(set(loads)) and len(loads) == 64  # each sidecar read once
    _, same_keys = epoch(side_by_side=4)  # a join keeping 8 shards, as before
    assert same_keys == keys and len(loads) > 64  # re-reads sidecars it had dropped
