"""Each tiny two-tower student of issue 11 trains on 2 ranks (torchrun, gloo, real DeepSpeed engines),
resumes exactly, exports, reloads strictly and evaluates (clip-eval) to identical numbers before
and after the export. One launch (tests/students/towers_worker.py) trains both.

Students: Mobile CLIP (configs/mobile-clip-tiny.yaml: timm MobileNetV3 + Lite Transformer, MLP
heads with dropout, BatchNorm; ZeRO-3) and TinyCLIP-ConvFFN (tinyclip-convffn-tiny.yaml: timm
TinyViT + HF BERT with WordPiece, ConvFFN text head, heads in their own learning-rate group;
ZeRO-2, 2 feature-cached micro-batches per step). KDEOV (kdeov-tiny.yaml, a LiT student in
open_clip format) has its own tests: test_lit.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.trainer import read_metrics, step_losses
from tests.students.conftest import launch_worker
from tests.students.towers_worker import STEPS, STUDENTS
from training import models
from training.evaluation.cli import main as clip_eval
from training.evaluation.loading import load_for_eval
from training.specs import model_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_file):
    """Shards, the shared teacher file and one training launch (tests/students/conftest.py)."""
    return launch_worker("tests/students/towers_worker.py", tmp_path_factory.mktemp("towers"),
                         teacher_file, train=64, val=32, zeroshot=32)


def probe(model, spec) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = spec.image_size if isinstance(spec.image_size, int) else spec.image_size[0]
    images = torch.randn(3, 3, size, size, generator=generator)
    ids = spec.tokenizer(["a photo of a red circle.", "two small blue squares at the top left",
                          "an image with three green crosses"])
    with torch.no_grad():
        return models.encode(model, images, ids)


@pytest.mark.parametrize("name", STUDENTS)
def test_resumed_run_repeats_the_uninterrupted_losses(world, name):
    reference = step_losses(world["out"] / name / "reference")
    resumed = step_losses(world["out"] / name / "resumed")
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert sorted(resumed) == list(range(3, STEPS + 1))  # resumed after step 2
    assert resumed == pytest.approx({s: reference[s] for s in resumed}, rel=1e-6, abs=1e-7)
    assert (world["out"] / name / "resumed" / "done.json").is_file()


@pytest.mark.parametrize("name", STUDENTS)
def test_ranks_hold_the_same_running_statistics(world, name):
    """Both students have BatchNorm (MobileNetV3, TinyViT's conv stages): each rank updates it
    from its own batches, and the trainer keeps one model (their mean over ranks)."""
    stats = [torch.load(world["out"] / name / f"stats-{rank}.pt") for rank in range(2)]
    means = [key for key in stats[0] if key.endswith("running_mean")]
    assert means and stats[0].keys() == stats[1].keys()
    assert any(stats[0][key].abs().sum() > 0 for key in means)  # trained, not the initial zeros
    for key in stats[0]:
        assert torch.equal(stats[0][key], stats[1][key]), key


@pytest.mark.parametrize("name", STUDENTS)
def test_export_reloads_strictly_with_the_checkpoints_outputs(world, name):
    run_dir = world["out"] / name / "reference"
    export = run_dir / "export"
    assert (export / "student.json").is_file()  # not open_clip's format: open_clip cannot hold it
    from_checkpoint = load_for_eval(str(run_dir))
    from_export = load_for_eval(str(export))
    expected = probe(from_checkpoint.model, from_checkpoint.spec)
    for key, value in probe(from_export.model, from_export.spec).items():
        assert torch.equal(value, expected[key]), key
    # the next stage names the export as its student: built with the export's weights, strictly
    student = model_spec(f"two-tower:{export}")
    assert student.tokenizer.identity == from_checkpoint.spec.tokenizer.identity
    next_stage = student.build().eval()
    for key, value in probe(next_stage, student).items():
        assert torch.equal(value, expected[key]), key


def clip_eval_record(checkpoint, world, out) -> dict:
    assert clip_eval(["eval", "--checkpoint", str(checkpoint), "--zeroshot",
                      str(world["zeroshot"]), "--retrieval", str(world["val"]), "--batch-size",
                      "16", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    return {section: {k: v for k, v in record[section].items() if k != "dataset"}
            for section in ("zeroshot", "retrieval")}


@pytest.mark.parametrize("name", STUDENTS)
def test_clip_eval_gives_identical_numbers_before_and_after_export(world, name, tmp_path):
    """clip-eval of the run's last checkpoint (before export) and of the export folder: every
    number identical. The trainer's own evaluation (the live model, 2 ranks, other batches)
    agrees up to near-ties: at most one query on either side of a recall."""
    run_dir = world["out"] / name / "reference"
    before = clip_eval_record(run_dir, world, tmp_path / "checkpoint.json")
    after = clip_eval_record(run_dir / "export", world, tmp_path / "export.json")
    assert after == before
    trained = [r for r in read_metrics(run_dir) if "eval/zeroshot/top1" in r][-1]
    compared = 0
    for section, prefix, queries in (("zeroshot", "eval/zeroshot/", 32),
                                     ("retrieval", "eval/val/", 32)):
        for key, value in after[section].items():
            if prefix + key in trained and ("R@" in key or key.startswith("top")):
                assert value == pytest.approx(trained[prefix + key], abs=1 / queries + 1e-9), key
                compared += 1
    assert compared == 8
