"""`clip-eval attribution`: heatmap PNGs and attribution.json with a map-agreement score that is 1
when the student is the teacher and lower for another model; maps of another patch grid are
compared on the smaller grid; bad input ends in one line."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from PIL import Image

from tests.helpers.evaluation import tiny_model
from training.evaluation.attribution import pearson, top_k_iou
from training.evaluation.cli import main
from training.models import export_open_clip


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribution_models")
    student = export_open_clip(tiny_model(seed=1), "Tiny-ViT-Student", root / "student")
    other = export_open_clip(tiny_model(seed=2), "Tiny-ViT-Student", root / "other")
    coarse_cfg = root / "Coarse-ViT.json"  # a 4x4 patch grid instead of 8x8
    coarse_cfg.write_text(json.dumps({
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1}}))
    return {"student": student, "other": other, "coarse": coarse_cfg}


def run(tmp_path, name, *args) -> dict:
    out = tmp_path / name
    assert main(["attribution", "--out", str(out), *args]) == 0
    return json.loads((out / "attribution.json").read_text())


def test_same_model_scores_one_and_another_scores_lower(tmp_path, eval_sets, exports, capsys):
    images = ["--images", str(eval_sets["val"]), "--num-images", "3"]
    same = run(tmp_path, "same", "--checkpoint", str(exports["student"]),
               "--teacher-checkpoint", str(exports["student"]), *images)
    assert same["num_pairs"] == 3 and same["compared_patches"] == 64
    assert same["mean_pearson"] == pytest.approx(1.0, abs=1e-6)
    assert same["mean_top_k_iou"] == 1.0
    other = run(tmp_path, "other", "--checkpoint", str(exports["other"]),
                "--teacher-checkpoint", str(exports["student"]), *images)
    assert other["mean_pearson"] < 0.9 and other["mean_top_k_iou"] < 1.0
    # the record's means are the means of its pairs; each pair's PNG is there: 3 panels + text
    assert other["mean_pearson"] == pytest.approx(
        sum(p["pearson"] for p in other["pairs"]) / 3)
    for pair in other["pairs"]:
        png = Image.open(tmp_path / "other" / pair["png"])
        assert png.format == "PNG" and png.size == (3 * 224, 224 + 28)
    assert [p["text"] for p in other["pairs"]] == [
        f"picture {i} number 0: a {c} square" for i, c in enumerate(("red", "green", "blue"))]
    assert '"mean_pearson"' in capsys.readouterr().out


def test_given_texts_and_another_patch_grid(tmp_path, eval_sets, exports):
    record = run(tmp_path, "coarse", "--checkpoint", str(exports["student"]),
                 "--teacher-model", str(exports["coarse"]), "--images", str(eval_sets["val"]),
                 "--num-images", "2", "--texts", "a red square", "a blue square",
                 "--top-fraction", "0.25")
    assert record["num_pairs"] == 4
    assert [p["text"] for p in record["pairs"]] == ["a red square", "a blue square"] * 2
    assert record["teacher"]["grid"] == [4, 4] and record["student"]["grid"] == [8, 8]
    assert record["compared_patches"] == 16 and record["top_k"] == 4
    assert all(-1.0 <= p["pearson"] <= 1.0 for p in record["pairs"])


def test_scores_against_direct_formulas():
    first = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 0.0, 2.0]])
    second = torch.tensor([[2.0, 4.0, 6.0, 8.5], [0.0, 1.0, 4.0, 2.0]])
    for row in range(2):
        a, b = first[row].tolist(), second[row].tolist()
        ma, mb = sum(a) / 4, sum(b) / 4
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        var = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
        assert pearson(first, second)[row].item() == pytest.approx(cov / var, rel=1e-6)
    # top-2 patches: {3, 2} vs {3, 2} -> 1; {0, 3} vs {2, 3} -> 1/3
    assert top_k_iou(first, second, 2).tolist() == pytest.approx([1.0, 1 / 3])


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere"], "needs a teacher"),
    (["--teacher-model", "Tiny-ViT-Student", "--num-images", "0"], "--num-images 0"),
    (["--teacher-model", "Tiny-ViT-Student", "--top-fraction", "1.5"], "--top-fraction 1.5"),
    (["--teacher-model", "Inherit-Tiny-RN-Teacher", "--model", "Tiny-ViT-Student"],
     "not ModifiedResNet"),
])
def test_bad_input_is_one_line(tmp_path, eval_sets, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["attribution", "--images", str(eval_sets["val"]), "--out", str(tmp_path / "o"),
              *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("clip-eval: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written
