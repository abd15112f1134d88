"""The config schema, its validation, the CLI's one-line errors, the optimizer groups, the LR
schedule and the DeepSpeed config dict: everything that runs before a worker does real work."""
from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from tests.helpers.clip_train_runs import clip_train_runs
from training.accumulation import concat_outputs, with_live_micro_batch
from training.config import ConfigError, TrainConfig, load_config, save_config
from training.engine import deepspeed_config
from training.optim import build_optimizer, build_scheduler, warmup_cosine_factor
from training.task import DistillationTask

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture
def minimal_yaml(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "shard-{000000..000001}.tar")},
        "model": {"student": "Tiny-ViT-Student", "teacher": "Tiny-ViT-Teacher"},
        "optim": {"total_steps": 10},
    }))
    return path


def test_defaults_and_overrides(minimal_yaml):
    cfg = load_config(str(minimal_yaml), ["deepspeed.zero_stage=3", "optim.lr=5e-4",
                                          "optim.betas=[0.9,0.95]", "model.teacher_dtype=bf16"],
                      cuda_available=False)
    assert isinstance(cfg, TrainConfig)
    assert cfg.deepspeed.zero_stage == 3 and cfg.optim.lr == 5e-4
    assert cfg.optim.betas == [0.9, 0.95] and cfg.model.teacher_dtype == "bf16"
    terms = cfg.loss.active_terms()  # affinity_weight unset and no loss.terms: affinity at 1.0
    assert list(terms) == ["affinity"] and terms["affinity"][0](0) == 1.0
    assert cfg.checkpoint.resume is None


@pytest.mark.parametrize("override, key", [
    (["optim.lrr=1"], "optim.lrr"),  # unknown key
    (["nosuch.section=1"], "nosuch"),
    (["optim.lr=fast"], "optim.lr"),  # wrong type
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["deepspeed.precision=fp16"], "deepspeed.precision"),  # fp16 on CPU
    (["deepspeed.precision=fp8"], "deepspeed.precision"),
    (["model.teacher=null"], "model.teacher"),  # affinity_weight > 0 without teacher
    (["optim.total_steps=null"], "optim.total_steps"),  # neither total_steps nor epochs
    (["optim.warmup_steps=10"], "optim.warmup_steps"),
    (["data.train_weights=[1,2]"], "data.train_weights"),
    (["log.wandb=sometimes"], "log.wandb"),
    (["eval.every_steps=5"], "eval.every_steps"),
    (["model.student_init=/nonexistent/init.safetensors"], "model.student_init"),
    (["checkpoint.resume=/nonexistent/step-1"], "checkpoint.resume"),
    (["optim.grad_accum_steps=0"], "optim.grad_accum_steps"),
    (["loss.affinity_weight=0"], "loss"),  # nothing to train
    (["justakey"], "justakey"),
])
def test_bad_values_name_the_key_in_one_line(minimal_yaml, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(str(minimal_yaml), override, cuda_available=False)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_an_override_of_the_run_length_replaces_the_recipes_other_one(minimal_yaml, tmp_path):
    """The recipe says total_steps: 10; `optim.epochs=3` means 3 epochs, and the other way round."""
    cfg = load_config(str(minimal_yaml), ["optim.epochs=3"], cuda_available=False)
    assert (cfg.optim.epochs, cfg.optim.total_steps) == (3, None)
    cfg = load_config(str(minimal_yaml), ["optim.epochs=3", "optim.total_steps=7"],
                      cuda_available=False)
    assert (cfg.optim.epochs, cfg.optim.total_steps) == (None, 7)
    both = tmp_path / "both.yaml"  # both in the file itself: still one clear error
    both.write_text(minimal_yaml.read_text().replace("total_steps: 10", "total_steps: 10\n  epochs: 2"))
    with pytest.raises(ConfigError, match="set exactly one of optim.total_steps and optim.epochs"):
        load_config(str(both), [], cuda_available=False)


def test_fp16_allowed_with_gpu(minimal_yaml):
    cfg = load_config(str(minimal_yaml), ["deepspeed.precision=fp16"], cuda_available=True)
    assert cfg.deepspeed.precision == "fp16"


def test_missing_required_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: x\nmodel: {student: Tiny-ViT-Student}\n")
    with pytest.raises(ConfigError, match="data.train"):
        load_config(str(path), cuda_available=False)


def test_saved_config_round_trips(minimal_yaml, tmp_path):
    cfg = load_config(str(minimal_yaml), ["seed=7", "loss.fixed_logit_scale=50"],
                      cuda_available=False)
    save_config(cfg, str(tmp_path / "saved.yaml"))
    assert load_config(str(tmp_path / "saved.yaml"), cuda_available=False) == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    cfg = load_config(str(recipe), ["data.train=/data/shard-{0..9}.tar",
                                    "model.teacher_pretrained=null", "model.student_init=null"],
                      cuda_available=True)
    from training.specs import model_spec
    assert model_spec(cfg.model.student).name  # the student's model config exists
    if recipe.name.startswith(("tinyclip-vit", "tinyclip-resnet")):  # the reference recipes
        assert cfg.model.teacher == "ViT-B-32" and cfg.loss.fixed_logit_scale == 50
        assert cfg.optim.weight_decay == 0.2 and cfg.optim.grad_clip == 5.0


def test_cli_bad_config_is_one_line_exit_2(minimal_yaml, tmp_path):
    results = clip_train_runs({  # `python -m training` thrice, in one process (imports paid once)
        "bad": ["--config", str(minimal_yaml), "deepspeed.zero_stage=4"],
        "missing": ["--config", "/nonexistent.yaml"],
        "checked": ["--config", str(minimal_yaml), "--check", "seed=3"]}, tmp_path)
    result, missing, checked = results["bad"], results["missing"], results["checked"]
    assert result["status"] == 2
    assert "Traceback" not in result["stderr"]
    assert result["stderr"].strip().count("\n") == 0
    assert "override 'deepspeed.zero_stage=4': key deepspeed.zero_stage" in result["stderr"]
    assert missing["status"] == 2 and "/nonexistent.yaml" in missing["stderr"]
    assert checked["status"] == 0 and yaml.safe_load(checked["stdout"])["seed"] == 3


def test_param_groups_leave_gains_biases_and_scale_undecayed():
    open_clip.add_model_config(str(REPO / "configs" / "models"))
    model = DistillationTask(open_clip.create_model("Tiny-ViT-Student"))
    optimizer = build_optimizer(model, TrainConfig().optim)
    decay, no_decay = optimizer.param_groups
    names = {id(p): n.removeprefix("student.") for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert decay_names | no_decay_names == set(names.values())
    assert not decay_names & no_decay_names
    assert {"logit_scale", "visual.class_embedding", "visual.ln_pre.weight",
            "visual.transformer.resblocks.0.attn.in_proj_bias"} <= no_decay_names
    assert {"visual.conv1.weight", "token_embedding.weight", "text_projection",
            "transformer.resblocks.0.mlp.c_fc.weight"} <= decay_names
    assert all(p.ndim >= 2 for p in decay["params"])


def test_warmup_then_cosine():
    cfg = TrainConfig().optim
    cfg.lr, cfg.min_lr, cfg.warmup_steps = 1.0, 0.1, 4
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert warmup_cosine_factor(20, warmup_steps=4, total_steps=14, min_ratio=0.1) == 0.1


def test_deepspeed_config_from_ours(minimal_yaml):
    cfg = load_config(str(minimal_yaml), ["deepspeed.zero_stage=2", "deepspeed.precision=bf16",
                                          "optim.grad_accum_steps=3", "data.batch_size=8",
                                          "optim.grad_clip=5"], cuda_available=False)
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 5.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_allow_untested_optimizer"] is True


def test_feature_cache_keeps_one_live_micro_batch_and_one_live_scale():
    params = torch.nn.Parameter(torch.ones(()))
    outs = [{"image_features": torch.randn(2, 3) * params, "logit_scale": params * 10}
            for _ in range(3)]
    joined = concat_outputs(outs)
    assert joined["image_features"].shape == (6, 3)
    live = with_live_micro_batch(outs, outs[1], 1)
    assert torch.equal(live["image_features"], joined["image_features"])
    assert not live["logit_scale"].requires_grad  # shared entries live in pass 0 only
    assert with_live_micro_batch(outs, outs[0], 0)["logit_scale"].requires_grad
    live["image_features"].sum().backward()
    assert params.grad == pytest.approx(outs[1]["image_features"].sum().item())
