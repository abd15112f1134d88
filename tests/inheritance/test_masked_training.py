"""Automatic inheritance through the trainer: model.mask config, a masked run, its pruned export,
and the automatic stage chain (mask -> prune uniform -> distil the pruned student)."""
import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.helpers.clip_train_runs import clip_train_runs
from tests.helpers.inheritance import model
from tests.helpers.shards import make_synthetic_shards
from tests.helpers.trainer import probe_batch, read_metrics, tiny_overrides
from training import models
from training.checkpoint_files import read_latest, read_module_state, read_run_record
from training.task import DistillationTask
from training.config import ConfigError, load_config
from training.inheritance.hard_concrete import HardConcreteGate
from training.inheritance.masked_clip import build_masked_student
from training.inheritance.prune import export_pruned_student, load_pruned
from training.inheritance.stages import load_stages, training_command
from training.task import TrainingHooks

TINY_MASKED = "configs/tiny-masked.yaml"
TINY_DISTILL = "configs/tiny-distill.yaml"
BASE = ["data.train=/x/{0..1}.tar", "model.teacher_pretrained=null", "model.student_init=null"]


TARGET = "model.mask.target_sparsity=0.5"


@pytest.mark.parametrize("override, key", [
    (["model.mask.lr=0.1"], "key model.mask.target_sparsity: required value is missing"),
    (["model.mask.target_sparsity=1.0"], "key model.mask.target_sparsity: must be in [0, 1)"),
    ([TARGET, "model.mask.start_sparsity=0.7"], "key model.mask.start_sparsity"),
    ([TARGET, "model.mask.prune_mode=magic"], "key model.mask.prune_mode"),
    ([TARGET, "model.mask.lr=0"], "key model.mask.lr"),
    ([TARGET, "model.mask.warmup_steps=-1"], "key model.mask.warmup_steps"),
    ([TARGET, "deepspeed.zero_stage=3"], "key deepspeed.zero_stage: model.mask needs ZeRO"),
    ([TARGET, "optim.grad_accum_steps=2"], "key optim.grad_accum_steps"),
    ([TARGET, "model.mask.gates=3"], "key model.mask.gates"),
])
def test_mask_config_errors_name_the_key(override, key):
    # the plain distillation recipe has no mask: the overrides create model.mask
    with pytest.raises(ConfigError) as err:
        load_config(TINY_DISTILL, BASE + override)
    assert key in str(err.value) and len(str(err.value).splitlines()) == 1
    assert load_config(TINY_DISTILL, BASE).model.mask is None


def test_cli_prints_one_line_for_a_bad_mask(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training", "--config", TINY_MASKED, *BASE,
                             "model.mask.prune_mode=magic", "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "clip-train: error: override 'model.mask.prune_mode=magic': key model.mask.prune_mode: "
        "must be one of "
        "('uniform', 'per_layer'), got 'magic'"]


def test_masked_student_declares_its_hooks():
    masked = build_masked_student("Tiny-ViT-Student", None, 0.5, warmup_steps=10, lr=0.3)
    assert isinstance(masked, TrainingHooks)
    (group,) = masked.extra_param_groups()
    assert {k: v for k, v in group.items() if k != "params"} == {
        "name": "mask", "lr": 0.3, "weight_decay": 0.0, "schedule": "constant"}
    names = {id(p): n for n, p in masked.named_parameters()}
    in_group = [names[id(p)] for p in group["params"]]
    assert sorted(in_group) == sorted(n for n in names.values() if not n.startswith("clip."))
    assert len(in_group) == 2 * 4 + 1  # 4 gate groups x 2 towers, one multiplier pair
    assert set(masked.regularization(5)) == {"lagrangian"}
    metrics = masked.metrics(5)
    assert set(metrics) == {"mask/expected_sparsity", "mask/target_sparsity", "mask/lambda1",
                            "mask/lambda2"} and metrics["mask/target_sparsity"] == 0.25
    assert build_masked_student("Tiny-ViT-Student", None, 0.5).extra_param_groups()[0]["lr"] == 0.05


def test_mask_group_has_its_own_constant_rate():
    from training.optim import build_optimizer, build_scheduler  # the optimizer's side of the hook
    from training.task import DistillationTask

    cfg = load_config(TINY_MASKED, BASE + ["optim.warmup_steps=10", "optim.total_steps=50"])
    masked = build_masked_student("Tiny-ViT-Student", None, 0.5, lr=cfg.model.mask.lr)
    optimizer = build_optimizer(DistillationTask(masked), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=50)
    mask_group = next(g for g in optimizer.param_groups if g.get("name") == "mask")
    names = {id(p): n for n, p in masked.named_parameters()}
    in_group = sorted(names[id(p)].split(".")[0] for p in mask_group["params"])
    assert set(in_group) == {"gates", "constraint"} and mask_group["weight_decay"] == 0.0
    assert len(in_group) == 2 * 4 + 1  # 4 gate groups x 2 towers, one multiplier pair
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    rates = scheduler.get_last_lr()
    assert rates[-1] == cfg.model.mask.lr and rates[0] == pytest.approx(cfg.optim.lr * 4 / 10)


def test_eval_gates_drop_the_expected_number_of_units():
    gate = HardConcreteGate(3, 100)
    # Rows of nearly equal gates at P(z != 0) = 0.65 and 0.5, and fully open: the plain clamped
    # sigmoid is > 0 for all of them (log_alpha > ln(0.1/1.1) = -2.4) and would keep them all.
    with torch.no_grad():
        gate.log_alpha[0] = -1.0
        gate.log_alpha[1] = -1.6
        gate.log_alpha[2] = 4.6
        gate.log_alpha[:2] += torch.linspace(0, 0.01, 100)  # ties broken: higher index kept
    kept = (gate.deterministic() > 0).sum(dim=1).tolist()
    expected = gate.prob_nonzero().sum(dim=1).round().tolist()
    assert kept[:2] == expected[:2] == [65, 50] and kept[2] == 100
    assert (gate.deterministic()[1, :50] == 0).all() and (gate.deterministic()[1, 50:] > 0).all()


def _masked_from_checkpoint(run_dir):
    tag_dir = os.path.join(run_dir, "checkpoints", read_latest(os.path.join(run_dir, "checkpoints")))
    state = DistillationTask.student_state(read_module_state(tag_dir))
    config = read_run_record(tag_dir)["config"]
    masked = build_masked_student(config["model"]["student"], None, 0.5)
    models.load_strict(masked, state, tag_dir)
    return masked.eval(), state, config


@pytest.mark.slow
def test_masked_run_learns_sparsity_exports_pruned_and_resumes_exactly(tmp_path):
    shards = make_synthetic_shards(tmp_path / "data", train=128, val=0, zeroshot=0)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(shards["train_shards"], run_dir, steps=30) + [
        "model.mask.warmup_steps=10", "model.mask.lr=0.3", "deepspeed.zero_stage=1",
        "model.teacher_pretrained=null", "checkpoint.every_steps=20"]
    # the run, then it resumed from step 20 in a fresh run dir: `python -m training` twice in
    # one worker process (the imports paid once)
    resumed = tmp_path / "resumed"
    results = clip_train_runs({
        "run": ["--config", TINY_MASKED, *overrides],
        "resumed": ["--config", TINY_MASKED, *overrides, f"run_dir={resumed}",
                    f"checkpoint.resume={run_dir / 'checkpoints' / 'step-00000020'}"]}, tmp_path)
    for name, result in results.items():
        assert result["status"] == 0, (name, result["stdout"][-2000:] + result["stderr"][-2000:])

    records = [r for r in read_metrics(run_dir) if "mask/expected_sparsity" in r]
    assert [r["step"] for r in records] == list(range(1, 31))
    sparsity = [r["mask/expected_sparsity"] for r in records]
    assert sparsity[0] < 0.02 and sparsity[-1] > 0.1  # moving towards the 0.5 target
    assert all(b >= a - 0.01 for a, b in zip(sparsity, sparsity[1:]))
    assert [r["mask/target_sparsity"] for r in records][:3] == pytest.approx([0.0, 0.05, 0.1])
    assert records[-1]["mask/target_sparsity"] == 0.5 and records[-1]["mask/lambda1"] > 0
    # the Lagrangian logged is lambda1 * gap + lambda2 * gap^2 (multipliers after the step,
    # so compare the sign and that it is not constant)
    assert len({round(r["loss_lagrangian"], 6) for r in records}) > 20

    # the uniform export: a plain open_clip model, strictly loaded, smaller than the student
    exported = open_clip.create_model(f"local-dir:{run_dir / 'export'}", output_dict=True).eval()
    masked, state, config = _masked_from_checkpoint(run_dir)
    full = sum(p.numel() for p in masked.clip.parameters())
    assert sum(p.numel() for p in exported.parameters()) < 0.97 * full
    images, texts = probe_batch()
    with torch.no_grad():
        want = masked(images, texts)
        got = exported(images, texts)
    # Uniform shapes round every layer to the same counts, an approximation of the gates:
    # close, not equal (the per-layer export below is the exact one).
    for key in ("image_features", "text_features"):
        assert F.cosine_similarity(got[key], want[key]).min() > 0.95

    # per_layer export of the same checkpoint: equal to the masked model in eval mode
    per_layer = export_pruned_student(state, config["model"]["student"],
                                      dict(config["model"]["mask"], prune_mode="per_layer"),
                                      tmp_path / "per_layer")
    pruned = load_pruned(per_layer)
    with torch.no_grad():
        image_features, text_features, _ = pruned(images, texts)
    assert torch.allclose(image_features, want["image_features"], atol=1e-5)
    assert torch.allclose(text_features, want["text_features"], atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < 0.97 * full

    # resumed from step 20 in a fresh run dir: steps 21-30 repeat exactly (gates, multipliers,
    # their optimizer state and the gate noise's RNG all come back)
    again = {r["step"]: r for r in read_metrics(resumed) if "mask/expected_sparsity" in r}
    assert sorted(again) == list(range(21, 31))
    for r in records[20:]:
        for key in ("loss", "loss_lagrangian", "mask/expected_sparsity", "mask/lambda1"):
            assert again[r["step"]][key] == pytest.approx(r[key], rel=1e-6, abs=1e-9), key


def test_auto_recipes_chain_through_the_previous_export():
    for recipe in ("configs/stages/tiny-auto.yaml", "configs/stages/tinyclip-auto.yaml"):
        cfg = load_stages(recipe, ["data=/x/{0..1}.tar"])
        assert any(o.startswith("model.mask.target_sparsity=") for o in
                   training_command(cfg, 0, "/s.safetensors"))
        second = training_command(cfg, 1, None)
        assert f"model.student=local-dir:{os.path.join(cfg.run_root, cfg.stages[0].name, 'export')}" \
            in second and "model.student_init=null" in second  # not the recipe's `teacher`
    with pytest.raises(ValueError, match=r"stages\[0\].student"):
        load_stages("configs/stages/tiny-auto.yaml", ["data=x", "stages.0.student=previous"])


@pytest.mark.slow
def test_tiny_auto_chain_masks_prunes_and_distils(tmp_path):
    shards = make_synthetic_shards(tmp_path / "data", train=64, val=0, zeroshot=0,
                                   samples_per_shard=32)["train_shards"]
    teacher = tmp_path / "teacher.safetensors"
    save_file(model("Tiny-ViT-Teacher", seed=5).state_dict(), str(teacher))
    root = tmp_path / "runs"
    command = [sys.executable, "-m", "training.inheritance.stages", "--config",
               "configs/stages/tiny-auto.yaml", f"run_root={root}", f"data={shards}",
               f"teacher_pretrained={teacher}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=500,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    mask_export = root / "mask" / "export"
    pruned_cfg = json.loads((mask_export / "open_clip_config.json").read_text())["model_cfg"]
    distilled = open_clip.create_model(f"local-dir:{root / 'distil' / 'export'}").eval()
    assert json.loads((root / "distil" / "export" / "open_clip_config.json").read_text()
                      )["model_cfg"] == pruned_cfg  # stage 2 trained the pruned shape
    assert sum(p.numel() for p in distilled.parameters()) < sum(
        p.numel() for p in model("Tiny-ViT-Teacher").parameters())
    saved = (root / "distil" / "config.yaml").read_text()
    assert "mask: null" in saved and f"local-dir:{mask_export}" in saved
