"""Every ZeRO stage trains under torchrun (2 ranks, gloo, CPU), ZeRO-3 exports, and feature-cached
gradient accumulation gives the full-batch gradient. One launch (tests/training/trainer_stages.py)
produces all the numbers; each test asserts one property."""
from __future__ import annotations

import json
import subprocess
import sys

import open_clip
import pytest
import torch

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.torchrun import REPO_ROOT, run_torchrun
from tests.helpers.trainer import probe_batch, step_losses
from training import models

pytestmark = pytest.mark.slow
STAGES = ("zero0", "zero1", "zero2", "zero3")


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    shards = make_synthetic_shards(root / "shards", train=256, val=0, zeroshot=0)
    out = root / "out"
    out.mkdir()
    run_torchrun(["tests/training/trainer_stages.py", "--shards", shards["train_shards"],
                  "--out", str(out)], nproc=2, timeout=900)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks


@pytest.mark.parametrize("run", STAGES + ("zero2-bf16",))
def test_each_stage_trains_and_lowers_the_fixed_batch_loss(launch, run):
    out, ranks = launch
    for rank in ranks:
        result = rank["runs"][run]
        assert result["finished"]
        assert result["after"] < result["before"] - 0.05, result
    assert sorted(step_losses(out / run)) == [1, 2, 3, 4, 5]
    assert (out / run / "done.json").is_file()
    assert (out / run / "checkpoints" / "latest").read_text().strip() == "step-00000005"


@pytest.mark.parametrize("run", STAGES + ("zero2-bf16",))
def test_ranks_hold_the_same_model(launch, run):
    out, _ = launch
    probes = [torch.load(out / f"probe-{run}-rank{r}.pt") for r in range(2)]
    for key in ("image_features", "text_features", "logit_scale"):
        torch.testing.assert_close(probes[0][key], probes[1][key], rtol=0, atol=0)


def test_stages_follow_the_same_trajectory_in_fp32(launch):
    """ZeRO partitions state; it must not change the maths."""
    out, _ = launch
    reference = step_losses(out / "zero0")
    for run in STAGES[1:]:
        losses = step_losses(out / run)
        assert losses.keys() == reference.keys()
        for step in reference:
            assert losses[step] == pytest.approx(reference[step], rel=1e-4), (run, step)
    probes = [torch.load(out / f"probe-{run}-rank0.pt") for run in STAGES]
    for probe in probes[1:]:
        torch.testing.assert_close(probe["image_features"], probes[0]["image_features"],
                                   rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("run", ["zero0", "zero3", "zero2-bf16"])
def test_export_loads_strictly_in_open_clip_with_the_same_outputs(launch, run):
    out, _ = launch
    export = out / run / "export"
    models.register_model_configs()
    model = open_clip.create_model("Tiny-ViT-Student",
                                   pretrained=str(export / "open_clip_model.safetensors"))
    also = open_clip.create_model(f"local-dir:{export}")
    images, texts = probe_batch()
    expected = torch.load(out / f"probe-{run}-rank0.pt")
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if "bf16" in run else {"rtol": 1e-4, "atol": 1e-5}
    with torch.no_grad():
        for loaded in (model, also):
            got = models.encode(loaded.eval(), images, texts)
            for key in ("image_features", "text_features"):
                torch.testing.assert_close(got[key], expected[key], **tolerance)


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_feature_cached_accumulation_gives_the_full_batch_gradient(launch, stage):
    _, ranks = launch
    for rank in ranks:
        result = rank["accumulation"][stage]
        assert result["grad_norm"] > 1e-3
        assert result["cached_vs_full"] < 1e-5, result
        assert result["naive_vs_full"] > 1e-2, result  # the check can tell them apart


def test_export_on_demand_from_a_zero3_checkpoint_equals_the_end_of_run_export(launch, tmp_path):
    out, _ = launch
    tag_dir = out / "zero3" / "checkpoints" / "step-00000005"
    result = subprocess.run([sys.executable, "-m", "training", "--export", str(tag_dir),
                             "--out", str(tmp_path / "again")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file
    again = load_file(tmp_path / "again" / "open_clip_model.safetensors")
    at_end = load_file(out / "zero3" / "export" / "open_clip_model.safetensors")
    assert again.keys() == at_end.keys()
    assert all(torch.equal(again[k], at_end[k]) for k in at_end)
