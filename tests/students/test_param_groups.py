"""Learning rates per parameter group (optim.param_groups: parameter-name globs over the task
module): which parameters each group takes, its own rate and weight decay, the schedule scaling
each group's own base rate, one-line errors before training, and exact resume (the tiny KDEOV
run of tests/students/students_worker.py, whose heads learn at twice the encoders' rate)."""
from __future__ import annotations

import subprocess
import sys

import open_clip
import pytest
import torch

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.torchrun import REPO_ROOT
from tests.helpers.trainer import TINY_DISTILL, read_metrics, step_losses
from training import models
from training.config import ConfigError, OptimConfig, ParamGroupConfig
from training.optim import build_optimizer, build_scheduler, named_param_groups
from training.task import DistillationTask, FeatureProjection

models.register_model_configs()


def task() -> DistillationTask:
    torch.manual_seed(0)
    student = open_clip.create_model("Tiny-ViT-Student", output_dict=True)
    return models.make_deepspeed_safe(DistillationTask(student, {"projection":
                                                                 FeatureProjection(64, 96)}))


def optim_config(*groups: ParamGroupConfig, **kw) -> OptimConfig:
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, total_steps=10, param_groups=list(groups), **kw)
    cfg.validate()
    return cfg


def test_groups_take_their_parameters_with_their_own_rate_and_decay():
    model = task()
    cfg = optim_config(ParamGroupConfig(name="heads", match=["heads.*", "*.*_projection",
                                                             "student.visual.proj"], lr=4e-3),
                       ParamGroupConfig(name="vision", match=["student.visual.*"], lr=5e-4,
                                        weight_decay=0.01))
    optimizer = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in optimizer.param_groups}
    members = {name: [names[id(p)] for p in g["params"]] for name, g in groups.items()}
    assert sorted(n for m in members.values() for n in m) == sorted(names.values())  # once each
    # halves left empty are left out: the heads' three parameters are all matrices
    assert set(groups) == {"decay", "no_decay", "heads", "vision", "vision.no_decay"}
    # the first matching group wins: student.visual.proj is the heads', not the vision group's
    assert set(members["heads"]) == {"heads.projection.linear.weight", "student.text_projection",
                                     "student.visual.proj"}
    assert all(n.startswith("student.visual.") for n in members["vision"] +
               members["vision.no_decay"])
    assert not any(n.startswith("student.visual.") for n in members["decay"] +
                   members["no_decay"])
    assert (groups["heads"]["lr"], groups["heads"]["weight_decay"]) == (4e-3, 0.1)
    assert (groups["vision"]["lr"], groups["vision"]["weight_decay"]) == (5e-4, 0.01)
    assert groups["vision.no_decay"]["weight_decay"] == 0.0 and groups["decay"]["lr"] == 1e-3


def test_schedule_scales_each_groups_own_base_rate():
    model = task()
    cfg = optim_config(ParamGroupConfig(name="heads", match=["heads.*"], lr=4e-3),
                       warmup_steps=2, min_lr=1e-4)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert rates[0]["decay"] == pytest.approx(0.5e-3) and rates[1]["decay"] == pytest.approx(1e-3)
    for rate in rates:
        assert rate["heads"] == pytest.approx(4 * rate["decay"], rel=1e-12)
    assert rates[-1]["decay"] < rates[2]["decay"]  # the cosine


def test_a_glob_that_matches_nothing_is_named():
    model = task()
    cfg = optim_config(ParamGroupConfig(name="heads", match=["heads.*"], lr=4e-3),
                       ParamGroupConfig(name="towers", match=["student.visual.*", "visual.*"]))
    with pytest.raises(ConfigError) as err:
        named_param_groups(model, cfg)
    message = str(err.value)
    assert message.startswith("key optim.param_groups.1.match: 'visual.*' matches no trainable "
                              "parameter") and "\n" not in message


def test_frozen_parameters_match_no_group():
    model = task()
    model.student.transformer.requires_grad_(False)
    cfg = optim_config(ParamGroupConfig(name="text", match=["student.transformer.*"]))
    with pytest.raises(ConfigError, match="optim.param_groups.0.match"):
        named_param_groups(model, cfg)


@pytest.mark.parametrize("group, key", [
    (dict(name="decay", match=["x"]), "optim.param_groups.0.name"),
    (dict(name="a", match=[]), "optim.param_groups.0.match"),
    (dict(name="a", match=["x"], lr=0.0), "optim.param_groups.0.lr"),
    (dict(name="a", match=["x"], weight_decay=-1.0), "optim.param_groups.0.weight_decay"),
])
def test_bad_groups_name_the_key(group, key):
    with pytest.raises(ConfigError, match=f"key {key}:"):
        optim_config(ParamGroupConfig(**group))


def test_a_name_used_twice_is_refused():
    with pytest.raises(ConfigError, match="key optim.param_groups.1.name: 'a' is used twice"):
        optim_config(ParamGroupConfig(name="a", match=["x"]), ParamGroupConfig(name="a",
                                                                               match=["y"]))


@pytest.mark.slow
def test_clip_train_refuses_an_unmatched_glob_in_one_line_before_training(tmp_path):
    shards = make_synthetic_shards(tmp_path / "data", train=32, val=0, zeroshot=0)
    result = subprocess.run(
        [sys.executable, "-m", "training", "--config", TINY_DISTILL,
         f"data.train={shards['train_shards']}",
         f"run_dir={tmp_path / 'run'}", "model.teacher_pretrained=null",
         "model.student_init=null", "data.workers=0",
         "optim.param_groups=[{name: heads, match: ['heads.*'], lr: 0.002}]"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("clip-train: error: key optim.param_groups.0.match: 'heads.*' matches "
                         "no trainable parameter of the task (names look like "
                         "student.positional_embedding, student.text_projection, ...)"), lines
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- the tiny KDEOV run on 2 ranks (tests/students/students_worker.py) -------------------------
@pytest.mark.slow
def test_heads_learn_at_their_own_rate_every_step(students):
    records = [r for r in read_metrics(students["out"] / "full") if "lr/heads" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert record["lr/heads"] == pytest.approx(2 * record["lr"], rel=1e-9)
    groups = {g["name"]: g for g in students["ranks"][0]["full"]["groups"]}
    assert set(groups) == {"decay", "no_decay", "heads", "heads.no_decay"}
    assert groups["heads"]["initial_lr"] == 2e-3 and groups["decay"]["initial_lr"] == 1e-3
    [heads] = students["ranks"][0]["full"]["named"]
    assert sorted(heads["names"]) == [  # FiLM's MLP and output, the vision tower's projection
        f"heads.fusion.{layer}.{kind}" for layer in ("film.0", "film.2", "out")
        for kind in ("bias", "weight")] + ["student.visual.head.proj.weight"]


@pytest.mark.slow
def test_resume_restores_every_groups_rate(students):
    full, resumed = (students["out"] / run for run in ("full", "resumed"))
    assert step_losses(resumed, "lr/heads") == step_losses(full, "lr/heads")
    assert step_losses(resumed, "lr") == step_losses(full, "lr")
