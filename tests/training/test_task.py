"""The task module (training/task.py): what it owns, what it declares, what export keeps, and
exact feature-cached accumulation with a trainable head (the feature projection), which the
trainer used to refuse."""
from __future__ import annotations

import open_clip
import torch

from tests.helpers.trainer import probe_batch
from training import models
from training.accumulation import with_live_micro_batch
from training.objectives import DistillationLoss
from training.task import DistillationTask, FeatureProjection, TrainingHooks

models.register_model_configs()


def tiny_task(projection: bool = True) -> DistillationTask:
    torch.manual_seed(0)
    student = open_clip.create_model("Tiny-ViT-Student", output_dict=True)
    heads = {"projection": FeatureProjection(64, 96)} if projection else {}
    return models.make_deepspeed_safe(DistillationTask(student, heads))


def test_outputs_groups_and_student_state():
    task = tiny_task()
    images, texts = probe_batch(n=3)
    out = task(images, texts)
    assert out["image_features_projected"].shape == (3, 96)
    assert out["text_features_projected"].shape == (3, 96)
    groups = task.param_groups(weight_decay=0.1)
    names = {id(p): n for n, p in task.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())  # every trainable parameter, once
    assert "heads.projection.linear.weight" in [names[id(p)] for p in groups[0]["params"]]
    state = DistillationTask.student_state(task.state_dict())
    assert set(state) == set(task.student.state_dict())  # no head in the export


def test_hooks_of_every_part_are_collected():
    class Counter(FeatureProjection, TrainingHooks):
        def regularization(self, step):
            return {"size": self.linear.weight.pow(2).sum() * step}

        def metrics(self, step):
            return {"head/step": torch.tensor(float(step))}

    task = DistillationTask(open_clip.create_model("Tiny-ViT-Student"), {"c": Counter(64, 8)})
    assert set(task.regularization(2)) == {"size"} and task.metrics(3)["head/step"] == 3


def test_accumulation_with_a_projection_head_is_exact():
    """Full batch of 8 in one pass == two micro-batches of 4 with feature caching."""
    images, texts = probe_batch(n=8)
    torch.manual_seed(1)
    teacher = {"image_features": torch.nn.functional.normalize(torch.randn(8, 96), dim=-1),
               "text_features": torch.nn.functional.normalize(torch.randn(8, 96), dim=-1),
               "logit_scale": torch.tensor(50.0)}
    loss_fn = DistillationLoss(affinity_weight=0.0, clip_weight=0.5, feature_weight=1.0)

    def grads(task):
        return [p.grad.clone() for p in task.parameters() if p.grad is not None]

    full = tiny_task()
    loss_fn(full(images, texts), teacher)["loss"].backward()
    cached_task = tiny_task()
    halves = [(images[i * 4:(i + 1) * 4], texts[i * 4:(i + 1) * 4]) for i in range(2)]
    with torch.no_grad():
        cached = [cached_task(*half) for half in halves]
    for index, half in enumerate(halves):
        outputs = with_live_micro_batch(cached, cached_task(*half), index)
        loss_fn(outputs, teacher)["loss"].backward()
    reference, accumulated = grads(full), grads(cached_task)
    assert len(reference) == len(accumulated) == len(list(full.parameters()))
    projection = [n for n, _ in full.named_parameters()].index("heads.projection.linear.weight")
    assert reference[projection].abs().sum() > 0
    for a, b in zip(accumulated, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
