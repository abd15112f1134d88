"""Each loss term against a direct formula on a small batch (single process; the 2-rank
gradients are in test_distributed_terms.py), K captions per image, schedules and balancers."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from training.objectives import TERMS, DistillationLoss, TermInputs, TermModels, row_ids
from training.objectives.schedules import parse_schedule


def unit_rows(n, d, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(requires_grad)


def outputs(n=6, d=8, seed=0, scale=14.0, k=1, requires_grad=False):
    """Model outputs of n images and k captions per image (n * k text rows, image-major)."""
    return {"image_features": unit_rows(n, d, seed, requires_grad),
            "text_features": unit_rows(n * k, d, seed + 1, requires_grad),
            "logit_scale": torch.tensor(scale, requires_grad=requires_grad)}


def with_heads(heads, student):
    """The student's outputs plus what the loss's task heads add (as the task module does)."""
    for head in heads.values():
        student = {**student, **head(student)}
    return student


def row_kl(p, logits):
    """mean_rows KL(p || softmax(logits)) through torch.distributions."""
    return torch.distributions.kl_divergence(torch.distributions.Categorical(probs=p),
                                             torch.distributions.Categorical(logits=logits)).mean()


def test_the_registry_holds_every_term_of_this_package():
    assert {"affinity", "clip", "feature", "tempkd", "interactive"} <= set(TERMS)


@pytest.mark.parametrize("tau", [0.05, 0.2])
def test_tempkd_is_row_and_column_kl_at_its_temperature(tau):
    student, teacher = outputs(seed=0, scale=3.0), outputs(seed=4, scale=90.0)
    out = DistillationLoss(terms={"tempkd": {"temperature": tau}})(student, teacher)
    s = student["image_features"] @ student["text_features"].T / tau
    t = teacher["image_features"] @ teacher["text_features"].T / tau
    expected = (row_kl(t.softmax(-1), s) + row_kl(t.T.softmax(-1), s.T)) / 2
    assert torch.allclose(out["tempkd"], expected, atol=1e-6)
    assert torch.allclose(out["loss"], expected, atol=1e-6)  # the models' scales play no part
    same = DistillationLoss(terms={"tempkd": {"temperature": tau}})(teacher, teacher)
    assert abs(same["tempkd"].item()) < 1e-6


def test_learned_tempkd_temperature_is_a_task_head_parameter_with_a_gradient():
    student, teacher = outputs(seed=0), outputs(seed=4)
    loss_fn = DistillationLoss(terms={"tempkd": {"temperature": 0.1, "learned": True}})
    heads = loss_fn.task_parts(TermModels(None, None, 8, 8))[0]
    (param,) = heads["tempkd_temperature"].parameters()
    assert torch.allclose(param.exp(), torch.tensor([0.1]))
    with torch.no_grad():
        param.fill_(torch.log(torch.tensor(0.25)).item())
    out = loss_fn(with_heads(heads, student), teacher)
    s = student["image_features"] @ student["text_features"].T / 0.25  # student side learned
    t = teacher["image_features"] @ teacher["text_features"].T / 0.1  # teacher at the option
    expected = (row_kl(t.softmax(-1), s) + row_kl(t.T.softmax(-1), s.T)) / 2
    assert torch.allclose(out["tempkd"], expected, atol=1e-6)
    out["loss"].backward()
    assert param.grad is not None and param.grad.abs().item() > 0
    full = with_heads(heads, student)
    assert full["tempkd_log_temperature"].shape == (1,)
    assert out["tempkd_temperature"].item() == pytest.approx(0.25)


@pytest.mark.parametrize("fixed", [None, 50.0])
def test_interactive_is_clip_loss_between_student_and_teacher_spaces(fixed):
    student, teacher = outputs(seed=0, scale=12.0), outputs(seed=4, scale=80.0)
    out = DistillationLoss(terms={"interactive": {}}, fixed_logit_scale=fixed)(student, teacher)
    scale = fixed or 12.0
    labels = torch.arange(6)
    expected = (F.cross_entropy(scale * student["image_features"] @ teacher["text_features"].T, labels)
                + F.cross_entropy(scale * student["text_features"] @ teacher["image_features"].T, labels)) / 2
    assert torch.allclose(out["interactive"], expected, atol=1e-6)


def test_interactive_with_a_projection_head_between_widths():
    student, teacher = outputs(d=8, seed=0), outputs(d=12, seed=4)
    loss_fn = DistillationLoss(terms={"interactive": {}})
    heads = loss_fn.task_parts(TermModels(None, None, 8, 12))[0]
    assert list(heads) == ["projection"]
    out = loss_fn(with_heads(heads, student), teacher)
    w = heads["projection"].linear.weight.detach()
    img, txt = (F.normalize(student[k] @ w.T, dim=-1) for k in ("image_features", "text_features"))
    labels = torch.arange(6)
    expected = (F.cross_entropy(14.0 * img @ teacher["text_features"].T, labels)
                + F.cross_entropy(14.0 * txt @ teacher["image_features"].T, labels)) / 2
    assert torch.allclose(out["interactive"], expected, atol=1e-6)


def test_l2_on_normalised_embeddings_is_the_cosine_feature_term_at_twice_the_weight():
    student, teacher = outputs(seed=0), outputs(seed=4)
    cosine = DistillationLoss(terms={"feature": {"kind": "cosine", "weight": 2.0}})(student, teacher)
    l2 = sum(((student[k] - teacher[k]) ** 2).sum(-1).mean()
             for k in ("image_features", "text_features")) / 2
    assert torch.allclose(cosine["loss"], l2, atol=1e-6)


def test_shorthand_keys_and_terms_give_the_same_objective():
    student, teacher = outputs(seed=0), outputs(seed=4, scale=25.0)
    short = DistillationLoss(affinity_weight=0.7, clip_weight=0.3, feature_weight=2.0,
                             feature_kind="cosine")(student, teacher)
    named = DistillationLoss(terms={"affinity": {"weight": 0.7}, "clip": {"weight": 0.3},
                                    "feature": {"weight": 2.0, "kind": "cosine"}})(student, teacher)
    assert set(short) == set(named) == {"loss", "affinity", "clip", "feature",
                                        "logit_scale", "teacher_logit_scale"}  # the scales applied
    for key in short:
        assert torch.allclose(short[key], named[key])


# ------------------------------------------------------------------ K captions per image

def test_k2_clip_term_soft_image_to_text_and_hard_text_to_image():
    n, k = 4, 2
    student = outputs(n=n, k=k, seed=3, scale=10.0)
    out = DistillationLoss(affinity_weight=0.0, clip_weight=1.0)(student)
    logits = 10.0 * student["image_features"] @ student["text_features"].T  # [n, n*k]
    log_p = logits.log_softmax(-1)
    i2t = -torch.stack([log_p[i, i * k:(i + 1) * k].mean() for i in range(n)]).mean()
    t2i = F.cross_entropy(logits.T, torch.arange(n * k) // k)
    assert torch.allclose(out["clip"], (i2t + t2i) / 2, atol=1e-6)


def test_k2_targets_when_two_images_share_a_caption_text():
    """Image 0's second caption and image 1's first are the same text (so the same embedding):
    positives stay by image (TinyCLIP-ConvFFN's rule), the shared text is a positive of its own
    image only, and the loss is the one computed with those targets by hand."""
    n, k = 3, 2
    student = outputs(n=n, k=k, seed=5, scale=10.0)
    student["text_features"][2] = student["text_features"][1]  # identical caption texts
    ids = row_ids(n, n * k, torch.device("cpu"))
    i2t, t2i = TermInputs(student, None, ids[0], ids[1], local_text_ids=ids[2],
                          global_text_ids=ids[3]).targets()
    assert torch.equal(i2t, torch.tensor([[.5, .5, 0, 0, 0, 0], [0, 0, .5, .5, 0, 0],
                                          [0, 0, 0, 0, .5, .5]]))
    assert torch.equal(t2i.argmax(-1), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(t2i.sum(-1), torch.ones(6)) and t2i.max() == 1
    out = DistillationLoss(affinity_weight=0.0, clip_weight=1.0)(student)
    logits = 10.0 * student["image_features"] @ student["text_features"].T
    expected = (-(i2t * logits.log_softmax(-1)).sum(-1).mean()
                + F.cross_entropy(logits.T, torch.tensor([0, 0, 1, 1, 2, 2]))) / 2
    assert torch.allclose(out["clip"], expected, atol=1e-6)


def test_k2_affinity_and_tempkd_use_images_by_texts_matrices():
    n, k = 3, 2
    student, teacher = outputs(n=n, k=k, seed=0, scale=5.0), outputs(n=n, k=k, seed=4, scale=30.0)
    out = DistillationLoss(terms={"affinity": {}, "tempkd": {"temperature": 0.1},
                                  "interactive": {}})(student, teacher)
    s = student["image_features"] @ student["text_features"].T
    t = teacher["image_features"] @ teacher["text_features"].T
    p_i2t, p_t2i = (30.0 * t).softmax(-1), (30.0 * t.T).softmax(-1)
    affinity = (-(p_i2t * (5.0 * s).log_softmax(-1)).sum(-1).mean()
                - (p_t2i * (5.0 * s.T).log_softmax(-1)).sum(-1).mean()) / 2
    assert torch.allclose(out["affinity"], affinity, atol=1e-6)
    tempkd = (row_kl((t / 0.1).softmax(-1), s / 0.1) + row_kl((t.T / 0.1).softmax(-1), s.T / 0.1)) / 2
    assert torch.allclose(out["tempkd"], tempkd, atol=1e-6)
    x = 5.0 * student["image_features"] @ teacher["text_features"].T
    y = 5.0 * student["text_features"] @ teacher["image_features"].T
    interactive = (-x.log_softmax(-1).reshape(n, n, k)[torch.arange(n), torch.arange(n)].mean()
                   + F.cross_entropy(y, torch.arange(n * k) // k)) / 2
    assert torch.allclose(out["interactive"], interactive, atol=1e-6)


def test_text_rows_must_be_a_multiple_of_image_rows():
    student = outputs(n=4)
    student["text_features"] = unit_rows(5, 8, seed=1)
    with pytest.raises(ValueError, match="5 text rows for 4 image rows"):
        DistillationLoss(affinity_weight=0.0, clip_weight=1.0)(student)


def test_k1_clip_is_still_open_clip_clip_loss():
    student = outputs(n=8, d=16, seed=2, scale=14.3)
    out = DistillationLoss(terms={"clip": {}})(student)
    theirs = ClipLoss()(student["image_features"], student["text_features"], student["logit_scale"])
    assert torch.allclose(out["loss"], theirs, atol=1e-6)


# ------------------------------------------------------------------ schedules

def test_schedules():
    linear = parse_schedule({"kind": "linear", "start": 0.0, "end": 1.0, "from_step": 10,
                             "to_step": 20})
    assert [linear(s) for s in (0, 10, 15, 20, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    steps = parse_schedule({"kind": "steps", "boundaries": [5, 8], "values": [1.0, 0.5, 0.0]})
    assert [steps(s) for s in (0, 4, 5, 7, 8, 100)] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    assert parse_schedule(2)(123) == 2.0 and parse_schedule(0).always_zero()


def test_a_scheduled_weight_is_applied_at_the_step_and_logged():
    student, teacher = outputs(seed=0), outputs(seed=4)
    loss_fn = DistillationLoss(terms={
        "clip": {"weight": {"kind": "steps", "boundaries": [3], "values": [1.0, 0.0]}},
        "affinity": {"weight": {"kind": "linear", "start": 0.0, "end": 2.0, "from_step": 0,
                                "to_step": 4}}})
    for step, (w_clip, w_aff) in {0: (1.0, 0.0), 2: (1.0, 1.0), 3: (0.0, 1.5), 9: (0.0, 2.0)}.items():
        out = loss_fn(student, teacher, step=step)
        assert out["weight_clip"].item() == w_clip and out["weight_affinity"].item() == w_aff
        assert torch.allclose(out["loss"], w_clip * out["clip"] + w_aff * out["affinity"])


# ------------------------------------------------------------------ balancing

def test_uncertainty_weighting_is_kendalls_formula_with_learned_log_variances():
    student, teacher = outputs(seed=0), outputs(seed=4)
    loss_fn = DistillationLoss(terms={"affinity": {"weight": 1.0}, "clip": {"weight": 0.5}},
                               balance="uncertainty")
    heads = loss_fn.task_parts(TermModels(None, None, 8, 8))[0]
    (log_vars,) = heads["balance"].parameters()
    with torch.no_grad():
        log_vars.copy_(torch.tensor([0.3, -0.2]))
    out = loss_fn(with_heads(heads, student), teacher)
    s = torch.tensor([0.3, -0.2])
    expected = (1.0 * (torch.exp(-s[0]) * out["affinity"] + s[0])
                + 0.5 * (torch.exp(-s[1]) * out["clip"] + s[1]))
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    assert torch.allclose(out["weight_clip"], 0.5 * torch.exp(-s[1]))
    out["loss"].backward()
    grad = torch.tensor([1.0, 0.5]) * (1 - torch.exp(-s) * torch.stack([out["affinity"], out["clip"]]))
    assert torch.allclose(log_vars.grad, grad, atol=1e-6)


def test_loss_ratio_divides_by_the_first_value_and_its_state_resumes_exactly():
    teacher = outputs(seed=4)
    config = dict(terms={"affinity": {}, "clip": {"weight": {"kind": "steps", "boundaries": [2],
                                                             "values": [0.0, 1.0]}}},
                  balance="loss_ratio")
    run = DistillationLoss(**config)
    first = [run(outputs(seed=10 + step), teacher, step=step) for step in range(2)]
    reference = {"affinity": first[0]["affinity"].item()}
    assert run.checkpoint_parts()["loss_balance"].state_dict() == {"reference": reference}
    assert torch.allclose(first[1]["loss"], first[1]["affinity"] / reference["affinity"])
    saved = run.checkpoint_parts()["loss_balance"].state_dict()
    later = [run(outputs(seed=10 + step), teacher, step=step) for step in range(2, 5)]
    assert run.balancer.reference["clip"] == later[0]["clip"].item()  # clip's first weighted step
    resumed = DistillationLoss(**config)
    resumed.checkpoint_parts()["loss_balance"].load_state_dict(saved)
    again = [resumed(outputs(seed=10 + step), teacher, step=step) for step in range(2, 5)]
    assert [o["loss"].item() for o in again] == [o["loss"].item() for o in later]
    fresh = DistillationLoss(**config)  # without the state the references would differ
    assert fresh(outputs(seed=12), teacher, step=2)["loss"].item() != later[0]["loss"].item()


# ------------------------------------------------------------------ config errors

@pytest.mark.parametrize("settings, message", [
    ({"terms": {"nosuch": {}}}, r"key loss.terms.nosuch: unknown term; known: affinity, attribution, clip"),
    ({"terms": {"tempkd": {"temprature": 1.0}}},
     r"key loss.terms.tempkd.temprature: unknown option; the tempkd term takes weight, temperature, learned"),
    ({"terms": {"clip": {"weight": -1}}}, r"key loss.terms.clip.weight: must be >= 0"),
    ({"terms": {"clip": {"weight": {"kind": "cosine"}}}}, r"key loss.terms.clip.weight: schedule kind"),
    ({"terms": {"clip": {"weight": {"kind": "linear", "start": 1}}}},
     r"key loss.terms.clip.weight: a linear schedule has exactly the keys .*missing: end"),
    ({"terms": {"tempkd": {"temperature": 0}}}, r"key loss.terms.tempkd: temperature must be > 0"),
    ({"terms": {"feature": {"kind": "l1"}}}, r"key loss.terms.feature: must be one of"),
    ({"clip_weight": 1.0, "terms": {"clip": {}}}, r"key loss.terms.clip: also set as loss.clip_weight"),
    ({"terms": {"clip": {"weight": 0}}}, r"key loss: all weights are 0"),
    ({"balance": "gradnorm"}, r"key loss.balance: must be one of"),
])
def test_config_errors_are_one_line_and_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message) as err:
        DistillationLoss(**settings)
    assert "\n" not in str(err.value)
