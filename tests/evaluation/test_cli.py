"""`clip-eval eval` on every kind of checkpoint this project writes, its record and zoo row,
and one-line errors for bad input."""
import json

import pytest
import torch

from tests.helpers.evaluation import REPO_ROOT, tiny_model
from training.evaluation.cli import main
from training.models import export_open_clip


def run_cli(capsys, *args):
    assert main(["eval", *args]) == 0
    return capsys.readouterr().out


def metrics_of(path):
    record = json.loads(path.read_text())
    return {task: {k: v for k, v in record[task].items()} for task in ("zeroshot", "retrieval")
            if task in record}


def test_export_folder_state_dict_and_name_give_the_same_numbers(tmp_path, eval_sets, capsys):
    model = tiny_model(seed=1)
    export = export_open_clip(model, "Tiny-ViT-Student", tmp_path / "export")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "weights.pt")
    sets = ["--zeroshot", str(eval_sets["zeroshot"]), "--retrieval", str(eval_sets["val"]),
            "--batch-size", "9"]
    run_cli(capsys, "--checkpoint", str(export), *sets, "--out", str(tmp_path / "a.json"))
    json_config = str(REPO_ROOT / "configs" / "models" / "Tiny-ViT-Student.json")
    out = run_cli(capsys, "--checkpoint", str(tmp_path / "weights.pt"), "--model", json_config,
                  *sets, "--cost", "--cost-batch-size", "2", "--cost-iters", "1",
                  "--out", str(tmp_path / "b.json"))
    assert metrics_of(tmp_path / "a.json") == metrics_of(tmp_path / "b.json")

    record = json.loads((tmp_path / "b.json").read_text())
    assert record["model"] == "Tiny-ViT-Student" and record["cost"]["image_macs"] == 8261888
    assert record["zeroshot"]["num_templates"] == 3
    row = (tmp_path / "b.md").read_text().splitlines()[2]
    top1 = 100 * record["zeroshot"]["top1"]
    assert row.startswith(f"| ViT-0.12M/8-Text-0.11M | weights.pt | 0.12 + 3.27 | {top1:.1f} |")
    assert row in out


@pytest.mark.slow
def test_training_run_dir_equals_its_export(trained_run, tmp_path, capsys):
    """A DeepSpeed run dir (model name from config.yaml, weights from checkpoints/latest) and
    the export the trainer wrote at the end hold the same model."""
    sets = ["--zeroshot", str(trained_run["zeroshot"]), "--retrieval", str(trained_run["val"])]
    run_cli(capsys, "--checkpoint", str(trained_run["run_dir"]), *sets,
            "--out", str(tmp_path / "run.json"))
    run_cli(capsys, "--checkpoint", str(trained_run["run_dir"] / "export"), *sets,
            "--out", str(tmp_path / "export.json"))
    assert metrics_of(tmp_path / "run.json") == metrics_of(tmp_path / "export.json")
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["model"] == "Tiny-ViT-Teacher"
    assert record["checkpoint"].endswith("checkpoints/step-00000008")


def test_imagefolder_with_imagenet_names(eval_sets, tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a photo of a {}.\n")   # open_clip-style placeholder
    out = run_cli(capsys, "--model", "Tiny-ViT-Student", "--zeroshot",
                  str(eval_sets["imagefolder"]), "--classnames", "imagenet", "--templates",
                  str(tmp_path / "one.txt"), "--max-samples", "3", "--out", str(tmp_path / "r.json"))
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["zeroshot"]["num_classes"] == 1000
    assert record["zeroshot"]["num_templates"] == 1 and record["zeroshot"]["num_images"] == 3
    assert record["checkpoint"] == "random init" and "| Tiny-ViT-Student | random init |" in out


def test_builtin_names_and_templates():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from training.evaluation.zeroshot import fill, resolve_classnames, resolve_templates
    assert len(resolve_classnames("imagenet", None)) == 1000
    openai = resolve_templates("openai", ["ignored {c}"])
    assert len(openai) == 80 and openai[0] is OPENAI_IMAGENET_TEMPLATES[0]
    assert fill(openai[0], "tench") == "a bad photo of a tench."
    assert len(resolve_templates("simple", None)) == 7
    assert resolve_templates(None, None) == ["a photo of a {c}."]
    assert fill("a {c} and {c}", "cat") == "a cat and cat" and fill("a {} photo", "cat") == "a cat photo"


@pytest.mark.parametrize("args,message", [
    (["--model", "Tiny-ViT-Student"], "nothing to do"),
    (["--checkpoint", "/nowhere/x.pt", "--cost"], "checkpoint /nowhere/x.pt not found"),
    (["--checkpoint", "{tmp}", "--cost"], "not an open_clip export"),
    (["--checkpoint", "{tmp}/w.pt", "--cost"], "--model is required"),
    (["--model", "No-Such-Model", "--cost"], "unknown model 'No-Such-Model'"),
    (["--model", "Tiny-ViT-Student", "--zeroshot", "{tmp}/none"], "evaluation set not found"),
    (["--model", "Tiny-ViT-Student", "--zeroshot", "{val}"], "no class names"),
    (["--model", "Tiny-ViT-Student", "--zeroshot", "{zs}", "--templates", "{tmp}/t.txt"],
     "template without"),
    (["--model", "Tiny-ViT-Student", "--cost", "--precision", "fp16", "--device", "cpu"],
     "'fp16' needs a GPU"),
    (["--model", "Tiny-ViT-Student", "--cost", "--batch-size", "0"], "--batch-size 0"),
    (["--checkpoint", "{tmp}/w.pt", "--model", "Tiny-ViT-Teacher", "--cost"],
     "does not fit the model"),
])
def test_bad_input_is_one_line(args, message, tmp_path, eval_sets, capsys):
    torch.save(tiny_model().state_dict(), tmp_path / "w.pt")
    (tmp_path / "t.txt").write_text("no placeholder here\n")
    args = [a.format(tmp=tmp_path, val=eval_sets["val"], zs=eval_sets["zeroshot"]) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("clip-eval: error: ") and "\n" not in err and message in err, err
