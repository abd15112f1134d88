"""Distilling from embeddings stored beside the shards (model.teacher_source=shards).

The reference is the live teacher on the same stored augmentations (model.teacher_embeddings with
the live source: the loader re-applies the set's crops and picks the same captions), so the only
difference between the two runs is where the teacher's outputs come from.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers.embeddings import SET_NAME, make_embedding_set, save_teacher
from tests.helpers.trainer import REPO_ROOT, TINY_DISTILL, step_losses, tiny_overrides
from training.losses import DistillationLoss


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return make_embedding_set(tmp_path_factory.mktemp("stored"))


def train(embedded, run_dir, *extra, steps=3):
    args = ["--config", TINY_DISTILL,
            *tiny_overrides(embedded["train_shards"], run_dir, steps=steps),
            f"model.teacher_pretrained={embedded['teacher']}", "checkpoint.export_at_end=false",
            "optim.grad_accum_steps=2", *extra]
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def stored(name=SET_NAME):
    return ["model.teacher_source=shards", f"model.teacher_embeddings={name}"]


def test_stored_embeddings_give_the_live_teachers_losses(embedded, tmp_path):
    live = train(embedded, tmp_path / "live", f"model.teacher_embeddings={SET_NAME}")
    assert live.returncode == 0, live.stdout[-2000:] + live.stderr[-2000:]
    read = train(embedded, tmp_path / "stored", *stored())
    assert read.returncode == 0, read.stdout[-2000:] + read.stderr[-2000:]
    live_losses, stored_losses = step_losses(tmp_path / "live"), step_losses(tmp_path / "stored")
    assert sorted(stored_losses) == [1, 2, 3]
    for step, loss in live_losses.items():
        assert abs(stored_losses[step] - loss) < 1e-5, (step, loss, stored_losses[step])
    # Not a trivially equal pair: the stored views differ from the freshly drawn ones.
    fresh = train(embedded, tmp_path / "fresh", steps=1)
    assert fresh.returncode == 0
    assert abs(step_losses(tmp_path / "fresh")[1] - live_losses[1]) > 1e-4


def copy_set(embedded, name) -> "Path":
    target = embedded["train"] / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(embedded["set_dir"], target)
    return target


def refusal(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("clip-train: error:"), result.stderr[-2000:]
    return lines[0]


def test_mismatched_or_tampered_sets_are_refused_in_one_line(embedded, tmp_path):
    other = save_teacher(tmp_path / "other.safetensors", seed=1)
    line = refusal(train(embedded, tmp_path / "a", *stored(), f"model.teacher_pretrained={other}"))
    assert "teacher 0 weights_sha256" in line

    folder = copy_set(embedded, "preprocess")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["embeddings"]["teachers"][0]["preprocess"]["mean"][0] = 0.5
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "teacher 0 preprocess" in refusal(train(embedded, tmp_path / "b", *stored("preprocess")))

    folder = copy_set(embedded, "lacking")
    (folder / "shard-000002.tar").unlink()
    line = refusal(train(embedded, tmp_path / "c", *stored("lacking")))
    assert "lacking/shard-000002.tar: missing" in line

    line = refusal(train(embedded, tmp_path / "d", *stored("nonexistent")))
    assert "no embedding set" in line and "nonexistent" in line

    folder = copy_set(embedded, "tampered")
    for shard in folder.glob("*.tar"):  # same size, other bytes: found when its shard is read
        data = bytearray(shard.read_bytes())
        data[1024] ^= 1
        shard.write_bytes(bytes(data))
    line = refusal(train(embedded, tmp_path / "e", *stored("tampered")))
    assert "sha256 differs from its manifest.json" in line
    assert not (tmp_path / "e" / "metrics.jsonl").exists() or not step_losses(tmp_path / "e")


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
    scales = loss.scales_used(student, {"ensemble": [a, b]})
    assert scales["teacher_logit_scale.0"] == 70 and scales["teacher_logit_scale.1"] == 60
