"""KDEOV's fusion heads (training/fusion.py): FiLM and cross-attention between text and visual
features, per sample, trained by the fused_feature term (training/objectives/fusion.py), exact
under feature-cached accumulation, and configured in one line of the recipe."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.trainer import probe_batch, step_losses
from training.accumulation import feature_cached_passes
from training.config import ConfigError, FusionConfig, load_config
from training.fusion import CrossAttentionFusion, FiLMFusion, build_fusion
from training.objectives import DistillationLoss
from training.objectives.base import TERMS, TermInputs
from training.task import DistillationTask
from tests.students.test_param_groups import task as tiny_task

KINDS = ("film", "cross_attention")


def features(n: int = 6, dim: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {kind: F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
            for kind in ("image_features", "text_features")}


def test_film_starts_as_the_identity_and_then_listens_to_the_text():
    torch.manual_seed(0)
    head = FiLMFusion(16, 8, hidden=12)
    inputs = features()
    fused = head(inputs)["fused_image_features"]
    torch.testing.assert_close(fused, F.normalize(head.out(inputs["image_features"]), dim=-1))
    torch.nn.init.normal_(head.film[-1].weight)
    other_text = {**inputs, "text_features": features(seed=1)["text_features"]}
    assert not torch.allclose(head(inputs)["fused_image_features"],
                              head(other_text)["fused_image_features"])
    gamma, beta = head.film(inputs["text_features"]).chunk(2, dim=-1)
    expected = head.out((1 + gamma) * inputs["image_features"] + beta)
    torch.testing.assert_close(head(inputs)["fused_image_features"], F.normalize(expected, dim=-1))


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_fuses_its_own_image_and_caption(kind):
    """Per sample in, per sample out (what feature caching needs): permuting the batch permutes
    the output, and the output is unit-norm at the requested width."""
    torch.manual_seed(0)
    head = build_fusion(FusionConfig(kind=kind, heads=2), dim=16, out_dim=24)
    inputs = features()
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    fused = head(inputs)["fused_image_features"]
    permuted = head({k: v[order] for k, v in inputs.items()})["fused_image_features"]
    assert fused.shape == (6, 24)
    torch.testing.assert_close(permuted, fused[order])
    torch.testing.assert_close(fused.norm(dim=-1), torch.ones(6))


def test_cross_attention_reads_token_level_outputs_when_present():
    torch.manual_seed(0)
    head = CrossAttentionFusion(16, 16, heads=4)
    generator = torch.Generator().manual_seed(2)
    inputs = {**features(n=3), "image_tokens": torch.randn(3, 5, 16, generator=generator),
              "text_tokens": torch.randn(3, 7, 16, generator=generator)}
    image, text = inputs["image_tokens"], inputs["text_tokens"]
    attended, _ = head.attention(image, text, text)
    expected = F.normalize(head.out(head.norm(image + attended).mean(dim=1)), dim=-1)
    torch.testing.assert_close(head(inputs)["fused_image_features"], expected)


def test_fused_feature_term_is_the_cosine_distance_to_the_teachers_images():
    inputs = features()
    teacher = features(seed=3)
    student = {"fused_image_features": inputs["image_features"]}
    value = TERMS["fused_feature"]()(TermInputs(student, teacher, torch.arange(6),
                                                torch.arange(6)))
    expected = 1 - (inputs["image_features"] * teacher["image_features"]).sum(-1).mean()
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_accumulation_with_a_fusion_head_is_exact(kind):
    """Full batch of 8 in one pass == two micro-batches of 4 with feature caching, the fusion
    head and its term included."""
    images, texts = probe_batch(n=8)
    torch.manual_seed(1)
    teacher = {**features(n=8, dim=64, seed=4), "logit_scale": torch.tensor(50.0)}
    loss_fn = DistillationLoss(affinity_weight=1.0, terms={"fused_feature": {"weight": 0.5}})

    def fused_task() -> DistillationTask:
        model = tiny_task()
        del model.heads["projection"]
        torch.manual_seed(5)
        model.heads["fusion"] = build_fusion(FusionConfig(kind=kind, heads=2), 64, 64)
        return model

    full = fused_task()
    losses = loss_fn(full(images, texts), teacher)
    assert losses["fused_feature"] > 0
    losses["loss"].backward()
    cached_task = fused_task()
    halves = [(images[:4], texts[:4]), (images[4:], texts[4:])]
    for _, outputs in feature_cached_passes(lambda half: cached_task(*half), halves, cached_task,
                                            torch.device("cpu")):
        loss_fn(outputs, teacher)["loss"].backward()
    reference = dict(full.named_parameters())
    fusion_grads = 0
    for name, param in cached_task.named_parameters():
        torch.testing.assert_close(param.grad, reference[name].grad, rtol=1e-4, atol=1e-6)
        fusion_grads += name.startswith("heads.fusion.") and param.grad.abs().sum() > 0
    assert fusion_grads >= 3


@pytest.mark.parametrize("overrides, key", [
    (["loss.terms.fused_feature.weight=0"], "loss.terms.fused_feature"),
    (["model.fusion.kind=gated"], "model.fusion.kind"),
    (["model.fusion=null"], "loss.terms.fused_feature"),
    (["model.fusion.heads=0"], "model.fusion.heads"),
])
def test_fusion_settings_are_checked_in_one_line(overrides, key, teacher_file):
    from tests.helpers.torchrun import REPO_ROOT
    with pytest.raises(ConfigError, match=f"key {key}:"):
        load_config(str(REPO_ROOT / "configs" / "kdeov-tiny.yaml"),
                    ["data.train=x", f"model.teacher_pretrained={teacher_file}", *overrides])


@pytest.mark.slow
def test_the_fused_term_trains_in_the_kdeov_recipe(students):
    """The logged total is affinity + 0.5 x fused_feature at every step (the recipe's weights)."""
    run = students["out"] / "full"
    total, affinity, fused = (step_losses(run, key) for key in ("loss", "affinity",
                                                                "fused_feature"))
    assert sorted(fused) == [1, 2, 3, 4] and all(v > 0 for v in fused.values())
    for step in total:
        assert total[step] == pytest.approx(affinity[step] + 0.5 * fused[step], rel=1e-5)
