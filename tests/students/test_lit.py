"""The LiT student (training/specs.py LitSpec, `lit:STUDENT`): the teacher's text tower, frozen,
in the student module; its text features computed once per step (the teacher source's), exact
resume, and an open_clip export whose evaluation equals the trained model's."""
from __future__ import annotations

import json
import subprocess
import sys

import open_clip
import pytest
import torch

from tests.helpers.torchrun import REPO_ROOT
from tests.helpers.trainer import probe_batch, read_metrics, step_losses
from training import models
from training.config import ConfigError, load_config
from training.specs import model_spec
from training.task import DistillationTask

TEXT_PARTS = ["ln_final", "positional_embedding", "text_projection", "token_embedding",
              "transformer"]


def lit_student():
    torch.manual_seed(0)
    teacher = model_spec("Tiny-ViT-Teacher").build().eval()
    spec = model_spec("lit:Tiny-LiT-Student")
    student = spec.build()
    spec.freeze_text_tower(student, teacher.state_dict())
    return spec, student, teacher


def test_text_tower_is_the_teachers_and_frozen():
    spec, student, teacher = lit_student()
    assert spec.text_from_teacher and spec.name == "Tiny-LiT-Student"
    own, theirs = student.state_dict(), teacher.state_dict()
    text = spec.text_keys(own)
    assert sorted({k.split(".")[0] for k in text}) == TEXT_PARTS
    assert all(torch.equal(own[k], theirs[k]) for k in text)
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in student.named_parameters() if n in set(text)}
    assert all(p.requires_grad for n, p in student.named_parameters()
               if n.startswith("visual.") or n == "logit_scale")
    task = DistillationTask(student)
    grouped = {id(p) for g in task.param_groups(0.1) for p in g["params"]}
    assert not grouped & {id(p) for p in student.parameters() if not p.requires_grad}


def test_teacher_text_features_equal_the_students_own():
    """What training feeds the student (the teacher's text features) is what its own frozen
    tower computes, so evaluation after export sees the trained model."""
    _, student, teacher = lit_student()
    images, texts = probe_batch()
    task = DistillationTask(student).eval()
    with torch.no_grad():
        taught = models.encode(teacher, images, texts)["text_features"]
        own = task(images, texts)
        shared = task(images, None, text_features=taught)
    assert torch.equal(own["text_features"], taught)
    assert torch.equal(shared["image_features"], own["image_features"])


def test_another_text_tower_is_refused_in_one_line():
    spec = model_spec("lit:Tiny-ViT-Student")  # text width 64, the teacher's is 128
    with pytest.raises(ValueError) as err:
        spec.freeze_text_tower(spec.build(), model_spec("Tiny-ViT-Teacher").build().state_dict())
    assert "shape mismatch" in str(err.value) and "\n" not in str(err.value)


def test_lit_needs_a_teacher_and_with_stored_embeddings_its_weights():
    recipe = str(REPO_ROOT / "configs" / "kdeov-tiny.yaml")
    common = ["data.train=x", "model.teacher_pretrained=null"]
    with pytest.raises(ConfigError, match="key model.teacher: required with model.student=lit:"):
        load_config(recipe, common + ["model.teacher=null", "loss.affinity_weight=0",
                                      "loss.clip_weight=1", "loss.terms.fused_feature.weight=0",
                                      "model.fusion=null"])
    with pytest.raises(ConfigError, match="key model.teacher_pretrained: required with "
                                          "model.student=lit:.* and stored embeddings"):
        load_config(recipe, common + ["model.teacher_source=shards",
                                      "model.teacher_embeddings=tiny"])


# ---- on 2 ranks (tests/students/students_worker.py) -------------------------------------------
@pytest.mark.slow
def test_text_features_are_computed_once_per_step(students):
    """4 steps of 2 micro-batches: the teacher's text tower runs once per micro-batch (each
    caption once), the student's never (it takes the teacher's features)."""
    for rank in students["ranks"]:
        assert rank["full"]["finished"]
        assert rank["full"]["text_calls"] == {"student": 0, "teacher": 8}


@pytest.mark.slow
def test_text_tower_stays_the_teachers_while_training(students):
    for rank in students["ranks"]:
        assert rank["full"]["text_equals_teacher"] and rank["full"]["text_tensors"] > 20
        assert rank["full"]["frozen"] == TEXT_PARTS
    from safetensors.torch import load_file
    exported = load_file(students["out"] / "full" / "export" / "open_clip_model.safetensors")
    teacher = load_file(students["teacher"])
    text = [k for k in exported if k.split(".")[0] in TEXT_PARTS]
    assert text and all(torch.equal(exported[k], teacher[k]) for k in text)


@pytest.mark.slow
def test_preempted_and_resumed_run_matches_the_uninterrupted_one(students):
    for rank in students["ranks"]:
        assert rank["resumed"] == {"first": False, "restored_step": 2, "second": True}
    full, resumed = (students["out"] / run for run in ("full", "resumed"))
    for key in ("loss", "affinity", "fused_feature", "lr/heads"):
        assert step_losses(resumed, key) == pytest.approx(step_losses(full, key), rel=1e-6)
    assert sorted(step_losses(full)) == [1, 2, 3, 4]
    from safetensors.torch import load_file
    a, b = (load_file(run / "export" / "open_clip_model.safetensors") for run in (full, resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_export_evaluates_like_the_trained_model(students, tmp_path):
    """clip-eval on the export (open_clip format, loaded strictly) gives the numbers the run's
    end-of-run evaluation logged for the model in memory (2 ranks)."""
    export = students["out"] / "full" / "export"
    models.register_model_configs()
    open_clip.create_model(f"local-dir:{export}")  # strict open_clip load
    logged = [r for r in read_metrics(students["out"] / "full") if "eval/zeroshot/top1" in r][-1]
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluation", "eval", "--checkpoint", str(export),
         "--zeroshot", str(students["zeroshot"]), "--retrieval", str(students["val"]),
         "--batch-size", "16", "--out", str(tmp_path / "record.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "record.json").read_text())
    for key in ("top1", "top5"):
        assert record["zeroshot"][key] == pytest.approx(logged[f"eval/zeroshot/{key}"], abs=1e-9)
    for key in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1",
                "text_to_image_R@5"):
        assert record["retrieval"][key] == pytest.approx(logged[f"eval/val/{key}"], abs=1e-9)


@pytest.mark.slow
def test_zero3_trains_and_exports_the_lit_student(students):
    for rank in students["ranks"]:
        assert rank["zero3"]["finished"]
    from safetensors.torch import load_file
    exported = load_file(students["out"] / "zero3" / "export" / "open_clip_model.safetensors")
    teacher = load_file(students["teacher"])
    assert all(torch.equal(exported[k], teacher[k]) for k in exported
               if k.split(".")[0] in TEXT_PARTS)
