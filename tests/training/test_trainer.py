"""`python -m training` as a plain single process (no launcher): plain CLIP of the tiny teacher on
synthetic shards with one corrupt image, periodic evaluation, checkpoints, metrics, TensorBoard
and the open_clip export. One run; each test checks one output."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.trainer import TINY_CLIP, probe_batch, read_metrics, tiny_overrides
from training import models
from training.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def corrupt_first_image(shard: Path) -> str:
    """Replace the first sample's JPEG bytes with garbage (the tar stays valid)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    name = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"this is not a jpeg" if member.name == name else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return name


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    shards = make_synthetic_shards(root / "shards", train=128, val=32, zeroshot=32,
                                   samples_per_shard=32)
    corrupt_first_image(Path(shards["train"]) / "shard-000000.tar")
    run_dir = root / "run"
    args = ["--config", TINY_CLIP, *tiny_overrides(shards["train_shards"], run_dir, steps=STEPS),
            "log.every_steps=2", "log.tensorboard=true", "checkpoint.every_steps=3",
            "checkpoint.keep_last=2", "eval.every_steps=3", f"eval.val={shards['val']}",
            f"eval.zeroshot={shards['zeroshot']}", "eval.batch_size=16"]
    result = subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result.stdout, args


def test_console_line_has_throughput_losses_lr_and_eta(run):
    _, stdout, _ = run
    lines = [line for line in stdout.splitlines() if f"step {STEPS}/{STEPS}" in line]
    assert lines, stdout[-2000:]
    for part in ("loss ", "clip ", "lr ", "logit_scale", "samples/s", "/rank)", "data wait",
                 "eta "):
        assert part in lines[-1], (part, lines[-1])


def test_console_names_the_run_dir_and_ends_with_a_summary(run):
    run_dir, stdout, _ = run
    lines = stdout.splitlines()
    assert any(f"training {STEPS} steps from step 0 in {run_dir}: " in line for line in lines)
    done = next(i for i, line in enumerate(lines) if f"done: {STEPS} of {STEPS} steps, " in line)
    assert f"samples seen" in lines[done] and lines[done].endswith(f"run directory {run_dir}")
    assert lines[done + 1].startswith("  final train: loss ")
    assert lines[done + 2].startswith("  final eval:  ") and "zeroshot/top1" in lines[done + 2]
    assert lines[done + 3] == f"  export:      {run_dir / 'export'}"
    assert not (run_dir / "running.json").exists()  # removed at the end: clip-status says done


def test_metrics_jsonl_records_training_eval_and_corrupt_samples(run):
    run_dir, _, _ = run
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for key in ("clip", "lr", "logit_scale", "samples_per_s", "samples_per_s_per_rank",
                "data_wait_s", "eta_s", "data/corrupt_skipped", "data/samples_read"):
        assert all(key in r for r in train), key
    assert train[-1]["data/corrupt_skipped"] == 1
    assert all(math.isfinite(r["loss"]) and r["loss"] == r["clip"] for r in train)
    evals = [r for r in records if "eval/zeroshot/top1" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0 <= r["eval/val/image_to_text_R@1"] <= 1 for r in evals)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_resolved_config_written_and_reloadable(run):
    run_dir, _, args = run
    saved = load_config(str(run_dir / "config.yaml"))
    assert saved == load_config(args[1], args[2:])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["total_steps"] == STEPS
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["train_batch_size"] == 8


def test_checkpoints_rotated_and_done_written_last(run):
    run_dir, _, _ = run
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step-{STEPS:08d}"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == [
        "step-00000003", f"step-{STEPS:08d}"]
    done = json.loads((run_dir / "done.json").read_text())
    assert done["step"] == STEPS and done["samples_seen"] == STEPS * 8
    done_at = (run_dir / "done.json").stat().st_mtime_ns  # the completion marker comes last
    assert done_at >= (checkpoints / "latest").stat().st_mtime_ns
    assert done_at >= (run_dir / "export" / "open_clip_model.safetensors").stat().st_mtime_ns
    state = torch.load(checkpoints / f"step-{STEPS:08d}" / "mp_rank_00_model_states.pt",
                       weights_only=False)
    assert state["train_state"]["step"] == STEPS
    assert set(state["rng"]["ranks"][0]) >= {"python", "numpy", "torch"}
    assert set(state) >= {"train_state", "data_position", "rng"}  # the named parts
    record = json.loads((checkpoints / f"step-{STEPS:08d}" / "run.json").read_text())
    assert record["config"]["optim"]["total_steps"] == STEPS and record["step"] == STEPS
    assert record["world_size"] == 1 and record["format"] == 2


def test_export_equals_the_checkpoint_weights(run):
    run_dir, _, _ = run
    export = run_dir / "export"
    models.register_model_configs()
    exported = open_clip.create_model("Tiny-ViT-Teacher",
                                      pretrained=str(export / "open_clip_model.safetensors"))
    state = torch.load(run_dir / "checkpoints" / f"step-{STEPS:08d}" /
                       "mp_rank_00_model_states.pt", weights_only=False)["module"]
    from_checkpoint = open_clip.create_model("Tiny-ViT-Teacher")
    student = {k.removeprefix("student."): v for k, v in state.items()}  # the task's student
    assert len(student) == len(state)  # no heads in a plain CLIP run
    models.load_strict(from_checkpoint, student, "checkpoint")
    images, texts = probe_batch()
    with torch.no_grad():
        a = models.encode(exported.eval(), images, texts)
        b = models.encode(from_checkpoint.eval(), images, texts)
    for key in ("image_features", "text_features", "logit_scale"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    config = json.loads((export / "open_clip_config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 64 and config["preprocess_cfg"]["size"] in (64, [64, 64])


def test_teacher_with_other_image_size_and_context_length(tmp_path):
    """The teacher gets its own view size and its own tokens (re-tokenized captions)."""
    teacher_cfg = json.loads((REPO / "configs" / "models" / "Tiny-ViT-Student.json").read_text())
    teacher_cfg["vision_cfg"]["image_size"] = 80
    teacher_cfg["text_cfg"]["context_length"] = 40
    teacher_json = tmp_path / "Tiny-Teacher-80px-ctx40.json"
    teacher_json.write_text(json.dumps(teacher_cfg))
    shards = make_synthetic_shards(tmp_path / "shards", train=32, val=0, zeroshot=0)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "training", "--config", str(REPO / "configs" / "tiny-distill.yaml"),
         *tiny_overrides(shards["train_shards"], run_dir, steps=2), f"model.teacher={teacher_json}",
         "optim.grad_accum_steps=2", "data.batch_size=4", "checkpoint.export_at_end=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["affinity"]) and r["affinity"] > 0 for r in train)
    assert json.loads((run_dir / "done.json").read_text())["samples_seen"] == 2 * 8
