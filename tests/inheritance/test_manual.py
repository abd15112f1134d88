"""Manual inheritance: depth rules, exact reproduction, layer subsets, importance, shapes."""
import glob
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.inheritance import inputs, model
from training.inheritance.importance import activation_scores, weight_norm_scores
from training.inheritance.manual import inherit, select_layers


def test_depth_rules():
    assert select_layers(12, 6, "interval") == [0, 2, 4, 6, 8, 10]
    assert select_layers(12, 9, "interval") == list(range(9))  # TinyCLIP's degradation
    spread = select_layers(12, 9, "uniform")
    assert spread[0] == 0 and spread[-1] == 11 and len(set(spread)) == 9 and spread == sorted(spread)
    assert select_layers(12, 6, "uniform") == [0, 2, 4, 7, 9, 11]
    assert select_layers(4, 4, "uniform") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="student has 5 layers"):
        select_layers(4, 5, "uniform")


@pytest.mark.parametrize("name", ["Tiny-ViT-Teacher", "Inherit-Tiny-RN-Teacher"])
@pytest.mark.parametrize("width", ["front", "importance"])
def test_same_shape_reproduces_teacher_exactly(name, width):
    teacher, student = model(name, seed=0), model(name, seed=1)
    inherit(teacher, student, depth="uniform", width=width, scores=weight_norm_scores(teacher))
    images, texts = inputs()
    with torch.no_grad():
        assert torch.equal(student.encode_image(images), teacher.encode_image(images))
        assert torch.equal(student.encode_text(texts), teacher.encode_text(texts))
    for key, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key


def test_fewer_layers_equal_teacher_running_only_those_layers():
    teacher, student = model("Tiny-ViT-Teacher"), model("Inherit-Tiny-ViT-Shallow", seed=1)
    plan = inherit(teacher, student, depth="uniform", width="front")
    assert plan.depth == {"visual.transformer.resblocks": [0, 3], "transformer.resblocks": [0, 2, 3]}
    for tower in (teacher.visual.transformer, teacher.transformer):
        kept = plan.depth["visual.transformer.resblocks" if tower is teacher.visual.transformer
                          else "transformer.resblocks"]
        tower.resblocks = torch.nn.ModuleList([tower.resblocks[i] for i in kept])
    # Residual stream after every block: record both models' block outputs.
    streams = {"teacher": [], "student": []}
    for label, m in (("teacher", teacher), ("student", student)):
        for block in m.visual.transformer.resblocks:
            block.register_forward_hook(lambda mod, a, out, label=label: streams[label].append(out))
    images, texts = inputs()
    with torch.no_grad():
        assert torch.equal(student.encode_image(images), teacher.encode_image(images))
        assert torch.equal(student.encode_text(texts), teacher.encode_text(texts))
    assert len(streams["student"]) == 2
    for s, t in zip(streams["student"], streams["teacher"]):
        assert torch.equal(s, t)


def _make_heads_important(teacher, block, heads, factor=8.0):
    """Scale the value rows and output columns of `heads` in one vision block."""
    attn = teacher.visual.transformer.resblocks[block].attn
    w, hd = attn.embed_dim, attn.head_dim
    with torch.no_grad():
        for h in heads:
            attn.in_proj_weight[2 * w + h * hd: 2 * w + (h + 1) * hd] *= factor
            attn.out_proj.weight[:, h * hd:(h + 1) * hd] *= factor


@pytest.mark.parametrize("measure", ["weight_norm", "activation"])
def test_importance_keeps_the_heads_made_important(measure):
    teacher, student = model("Tiny-ViT-Teacher"), model("Tiny-ViT-Student", seed=1)
    _make_heads_important(teacher, block=0, heads=[1, 3])
    _make_heads_important(teacher, block=3, heads=[0, 2])
    if measure == "weight_norm":
        scores = weight_norm_scores(teacher)
    else:
        scores = activation_scores(teacher, [inputs(n=4, seed=s) for s in range(2)])
    plan = inherit(teacher, student, depth="uniform", width="importance", scores=scores)
    assert plan.depth["visual.transformer.resblocks"] == [0, 3]
    assert plan.units["visual.transformer.resblocks.0.attn.heads"] == [1, 3]
    assert plan.units["visual.transformer.resblocks.3.attn.heads"] == [0, 2]
    front = inherit(teacher, model("Tiny-ViT-Student"), width="front")
    assert front.units["visual.transformer.resblocks.0.attn.heads"] == [0, 1]


def test_every_tensor_on_an_axis_is_sliced_alike():
    teacher, student = model("Tiny-ViT-Teacher"), model("Tiny-ViT-Student", seed=1)
    plan = inherit(teacher, student, width="importance", scores=weight_norm_scores(teacher))
    hidden = torch.tensor(plan.units["visual.hidden"])
    heads = plan.units["visual.transformer.resblocks.3.attn.heads"]
    mlp = torch.tensor(plan.units["visual.transformer.resblocks.3.mlp"])
    t, s = teacher.visual, student.visual
    head_rows = torch.cat([torch.arange(h * 32, h * 32 + 32) for h in heads])
    qkv_rows = torch.cat([head_rows + part * 128 for part in range(3)])
    tb, sb = t.transformer.resblocks[3], s.transformer.resblocks[1]
    assert torch.equal(s.class_embedding, t.class_embedding[hidden])
    assert torch.equal(s.positional_embedding, t.positional_embedding[:, hidden])
    assert torch.equal(s.conv1.weight, t.conv1.weight[hidden])
    assert torch.equal(s.proj, t.proj[hidden])
    assert torch.equal(sb.ln_2.bias, tb.ln_2.bias[hidden])
    assert torch.equal(sb.attn.in_proj_weight, tb.attn.in_proj_weight[qkv_rows][:, hidden])
    assert torch.equal(sb.attn.out_proj.weight, tb.attn.out_proj.weight[hidden][:, head_rows])
    assert torch.equal(sb.mlp.c_fc.weight, tb.mlp.c_fc.weight[mlp][:, hidden])
    assert torch.equal(sb.mlp.c_proj.weight, tb.mlp.c_proj.weight[hidden][:, mlp])


def test_resnet_batchnorm_statistics_follow_the_channels():
    teacher, student = model("Inherit-Tiny-RN-Teacher"), model("Inherit-Tiny-RN-Student", seed=1)
    with torch.no_grad():  # distinct running statistics, so a wrong index shows
        for i, bn in enumerate(m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.randn_like(bn.running_mean))
            bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    scores = activation_scores(teacher, [inputs(n=4)])
    plan = inherit(teacher, student, depth="uniform", width="importance", scores=scores)
    assert plan.depth["visual.layer2"] == [0, 1] and plan.depth["visual.layer1"] == [0]
    res = torch.tensor(plan.units["visual.layer2.res"])
    mid = torch.tensor(plan.units["visual.layer2.1.mid1"])
    tb, sb = teacher.visual.layer2[1], student.visual.layer2[1]
    assert torch.equal(sb.bn3.running_mean, tb.bn3.running_mean[res])
    assert torch.equal(sb.bn1.running_var, tb.bn1.running_var[mid])
    assert torch.equal(sb.conv1.weight, tb.conv1.weight[mid][:, res])
    downsample_bn = "layer2.0.downsample.1.weight"  # Sequential keys are -1 (pool), 0, 1
    assert torch.equal(student.visual.state_dict()[downsample_bn],
                       teacher.visual.state_dict()[downsample_bn][res])
    assert len(plan.units["visual.attnpool.heads"]) == 4  # 8 * 32 // 64


@pytest.mark.parametrize("student_name, message", [
    ("Tiny-ViT-Teacher", "larger than the teacher"),
    ("Inherit-Tiny-RN-Student", "same family"),
])
def test_misfits_are_refused_with_a_clear_error(student_name, message):
    small, other = model("Tiny-ViT-Student"), model(student_name)
    with pytest.raises(ValueError, match=message):
        inherit(small, other)


def _teacher_for(config: dict) -> str:
    vision = config["vision_cfg"]
    if isinstance(vision["layers"], list):
        return "RN50"
    return {32: "ViT-B-32", 16: "ViT-B-16"}[vision["patch_size"]]


@pytest.mark.slow
def test_tinyclip_shapes_inherit_from_openai_shaped_teachers():
    configs = sorted(glob.glob("configs/models/TinyCLIP-*.json"))
    assert len(configs) == 6, configs
    teachers = {}
    for path in configs:
        config = json.loads(Path(path).read_text())
        name = _teacher_for(config)
        teacher = teachers.setdefault(name, model(name))
        student = model(Path(path).stem, seed=1)
        for depth, width in (("interval", "front"), ("uniform", "importance")):
            plan = inherit(teacher, student, depth=depth, width=width,
                           scores=weight_norm_scores(teacher))
            assert plan.units  # every student tensor was filled (load_state_dict strict)
        assert student.state_dict()["logit_scale"] == teacher.state_dict()["logit_scale"]
