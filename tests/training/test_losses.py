"""DistillationLoss against references computed another way (single process; the distributed
equality is in test_distributed_grad.py)."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from training.objectives import DistillationLoss, contrastive_targets, soft_cross_entropy
from training.task import FeatureProjection


def unit_rows(n, d, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return x.requires_grad_(requires_grad)


def outputs(n=6, d=8, seed=0, scale=14.0, requires_grad=False):
    return {"image_features": unit_rows(n, d, seed, requires_grad),
            "text_features": unit_rows(n, d, seed + 1, requires_grad),
            "logit_scale": torch.tensor(scale, requires_grad=requires_grad)}


def test_soft_cross_entropy_is_kl_plus_teacher_entropy():
    g = torch.Generator().manual_seed(1)
    student_logits, teacher_logits = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p = teacher_logits.softmax(-1)
    q = torch.distributions.Categorical(logits=student_logits)
    teacher = torch.distributions.Categorical(probs=p)
    expected = (torch.distributions.kl_divergence(teacher, q) + teacher.entropy()).mean()
    assert torch.allclose(soft_cross_entropy(student_logits, p), expected, atol=1e-6)


def test_identical_student_and_teacher_give_the_minimum():
    teacher = outputs(seed=3, scale=20.0)
    loss_fn = DistillationLoss(affinity_weight=1.0)
    student = {k: v.clone().requires_grad_(True) for k, v in teacher.items()}
    at_minimum = loss_fn(student, teacher)["loss"]
    # The minimum of soft-target CE is the teacher's entropy, averaged over rows and directions.
    i2t = 20.0 * teacher["image_features"] @ teacher["text_features"].T
    entropy = sum(torch.distributions.Categorical(logits=z).entropy().mean() for z in (i2t, i2t.T)) / 2
    assert torch.allclose(at_minimum, entropy, atol=1e-5)
    at_minimum.backward()
    assert student["image_features"].grad.abs().max() < 1e-6
    for seed in range(3):
        moved = outputs(seed=10 + seed, scale=20.0)
        assert loss_fn(moved, teacher)["loss"] > at_minimum + 1e-3


def test_affinity_gradients_match_hand_written_reference():
    n, d, s_scale, t_scale = 5, 4, 12.0, 30.0
    student, teacher = outputs(n, d, seed=5, scale=s_scale, requires_grad=True), outputs(n, d, seed=7, scale=t_scale)
    DistillationLoss(affinity_weight=1.0)(student, teacher)["loss"].backward()

    img, txt = student["image_features"].detach(), student["text_features"].detach()
    p_i2t = (t_scale * teacher["image_features"] @ teacher["text_features"].T).softmax(-1)
    p_t2i = (t_scale * teacher["text_features"] @ teacher["image_features"].T).softmax(-1)
    # d/dz of mean_rows CE(z, p) is (softmax(z) - p) / n; the two directions are averaged.
    g_i2t = ((s_scale * img @ txt.T).softmax(-1) - p_i2t) / n / 2
    g_t2i = ((s_scale * txt @ img.T).softmax(-1) - p_t2i) / n / 2
    grad_img = s_scale * (g_i2t @ txt + g_t2i.T @ txt)
    grad_txt = s_scale * (g_i2t.T @ img + g_t2i @ img)
    grad_scale = (g_i2t * (img @ txt.T)).sum() + (g_t2i * (txt @ img.T)).sum()
    assert torch.allclose(student["image_features"].grad, grad_img, atol=1e-6)
    assert torch.allclose(student["text_features"].grad, grad_txt, atol=1e-6)
    assert torch.allclose(student["logit_scale"].grad, grad_scale, atol=1e-6)


@pytest.mark.parametrize("fixed", [None, 50.0])
def test_clip_term_equals_open_clip_clip_loss(fixed):
    student = outputs(n=8, d=16, seed=2, scale=14.3)
    ours = DistillationLoss(affinity_weight=0.0, clip_weight=1.0, fixed_logit_scale=fixed)(student)
    scale = torch.tensor(fixed) if fixed else student["logit_scale"]
    theirs = ClipLoss()(student["image_features"], student["text_features"], scale)
    assert torch.allclose(ours["clip"], theirs, atol=1e-6)
    assert torch.allclose(ours["loss"], theirs, atol=1e-6)


def test_total_is_the_weighted_sum_of_the_terms():
    student, teacher = outputs(seed=0), outputs(seed=4, scale=25.0)
    loss_fn = DistillationLoss(affinity_weight=0.7, clip_weight=0.3, feature_weight=2.0)
    out = loss_fn(student, teacher)
    assert set(out) == {"loss", "affinity", "clip", "feature", "logit_scale", "teacher_logit_scale"}
    expected = 0.7 * out["affinity"] + 0.3 * out["clip"] + 2.0 * out["feature"]
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    assert torch.allclose(out["feature"], (F.mse_loss(student["image_features"], teacher["image_features"])
                                           + F.mse_loss(student["text_features"], teacher["text_features"])) / 2)


def test_fixed_scale_replaces_both_scales_and_keeps_a_zero_gradient_on_the_student_scale():
    student, teacher = outputs(seed=0, scale=3.0, requires_grad=True), outputs(seed=4, scale=7.0)
    out = DistillationLoss(affinity_weight=1.0, clip_weight=0.5, fixed_logit_scale=50.0)(student, teacher)
    with_50 = DistillationLoss(affinity_weight=1.0, clip_weight=0.5)(
        {**student, "logit_scale": torch.tensor(50.0)}, {**teacher, "logit_scale": torch.tensor(50.0)})
    assert torch.allclose(out["loss"], with_50["loss"], atol=1e-6)
    out["loss"].backward()
    assert student["logit_scale"].grad is not None and student["logit_scale"].grad.item() == 0.0


def test_cosine_feature_term_with_projection_between_different_widths():
    student, teacher = outputs(n=4, d=8, seed=0, requires_grad=True), outputs(n=4, d=12, seed=9)
    loss_fn = DistillationLoss(affinity_weight=0.0, feature_weight=1.0, feature_kind="cosine")
    head = FeatureProjection(8, 12)  # the task's head (training/task.py) adds the projections
    assert head.linear.weight.shape == (12, 8)
    out = loss_fn({**student, **head(student)}, teacher)
    proj = head.linear.weight.detach()
    expected = sum((1 - F.cosine_similarity(student[k].detach() @ proj.T, teacher[k], dim=-1)).mean()
                   for k in ("image_features", "text_features")) / 2
    assert torch.allclose(out["feature"], expected, atol=1e-6)
    out["loss"].backward()
    assert head.linear.weight.grad.abs().sum() > 0


def test_fp16_and_bf16_inputs_are_computed_in_fp32():
    student, teacher = outputs(seed=0), outputs(seed=4, scale=25.0)
    loss_fn = DistillationLoss(affinity_weight=1.0, clip_weight=1.0)
    reference = loss_fn(student, teacher)["loss"]
    half = {k: v.to(torch.bfloat16) for k, v in student.items()}
    out = loss_fn(half, teacher)["loss"]
    assert out.dtype == torch.float32
    assert torch.allclose(out, loss_fn({k: v.float() for k, v in half.items()}, teacher)["loss"])
    assert torch.allclose(out, reference, atol=0.05)


def test_multi_positive_targets_spread_over_same_ids():
    targets = contrastive_targets(torch.tensor([0, 1]), torch.tensor([0, 0, 1, 2]))
    assert torch.equal(targets, torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))


def test_rows_may_be_cached_micro_batches_and_the_accumulated_gradient_is_the_full_one():
    """OpenCLIP-style gradient accumulation: features of all micro-batches computed without grad,
    then per micro-batch one of them recomputed with grad; the sum of the backwards equals the
    full-batch gradient."""
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    img_tower, txt_tower = torch.nn.Linear(10, 6), torch.nn.Linear(10, 6)
    teacher = outputs(n=8, d=6, seed=11, scale=30.0)
    loss_fn = DistillationLoss(affinity_weight=1.0, clip_weight=0.5, feature_weight=1.0)

    def student(rows):
        return {"image_features": F.normalize(img_tower(images[rows]), dim=-1),
                "text_features": F.normalize(txt_tower(texts[rows]), dim=-1),
                "logit_scale": torch.tensor(20.0)}

    def grads():
        out = [p.grad.clone() for p in (*img_tower.parameters(), *txt_tower.parameters())]
        for p in (*img_tower.parameters(), *txt_tower.parameters()):
            p.grad = None
        return out

    loss_fn(student(slice(0, 8)), teacher)["loss"].backward()
    full = grads()
    micro = [slice(0, 4), slice(4, 8)]
    with torch.no_grad():
        cached = [student(rows) for rows in micro]
    for j, rows in enumerate(micro):
        parts = [student(rows) if i == j else cached[i] for i in range(len(micro))]
        rows_out = {k: torch.cat([p[k] for p in parts]) for k in ("image_features", "text_features")}
        loss_fn({**rows_out, "logit_scale": torch.tensor(20.0)}, teacher)["loss"].backward()
    for a, b in zip(full, grads()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_configuration_and_missing_teacher_are_clear_errors():
    with pytest.raises(ValueError, match="feature_kind"):
        DistillationLoss(feature_kind="l1")
    with pytest.raises(ValueError, match="all weights are 0"):
        DistillationLoss(affinity_weight=0.0)
    with pytest.raises(ValueError, match="needs teacher"):
        DistillationLoss(affinity_weight=1.0)(outputs())
    with pytest.raises(ValueError, match="teacher outputs lack logit_scale"):
        teacher = outputs(seed=3)
        del teacher["logit_scale"]
        DistillationLoss(affinity_weight=1.0)(outputs(), teacher)
    with pytest.raises(ValueError, match="a FeatureProjection head"):
        DistillationLoss(affinity_weight=0.0, feature_weight=1.0)(outputs(d=8), outputs(d=12))
