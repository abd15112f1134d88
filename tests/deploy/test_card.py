"""The model card's numbers equal the run's own records, read here independently."""
import hashlib
import json

import pytest

from training.checkpoint_files import find_tag_dir

# the shared trained run and export (conftest.py) take about a minute
pytestmark = pytest.mark.slow


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def card(exported):
    return json.loads((exported / "card.json").read_text())


def test_training_numbers_equal_run_json_and_done_json(card, trained):
    run_dir = trained["run_dir"]
    run = json.loads((find_tag_dir(run_dir) / "run.json").read_text())
    done = json.loads((run_dir / "done.json").read_text())
    training = card["training"]
    assert training["step"] == run["step"] == done["step"]
    assert training["total_steps"] == run["total_steps"]
    assert training["samples_seen"] == done["samples_seen"]
    assert training["world_size"] == run["world_size"] and training["completed"] is True
    assert training["loss"] == run["config"]["loss"]


def test_teacher_inheritance_and_data_hashes(card, trained):
    training = card["training"]
    assert training["teacher"]["weights_sha256"] == sha256(trained["teacher"])
    record = json.loads((trained["root"] / "inherit" / "inheritance.json").read_text())
    assert training["inheritance"]["weights_sha256"] == record["weights"]["sha256"] == sha256(
        trained["root"] / "inherit" / "student.safetensors")
    assert training["inheritance"]["init_matches_record"] is True
    manifest_path = trained["train"] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    [data] = training["data"]
    assert data["manifest_sha256"] == sha256(manifest_path)
    assert data["written"] == manifest["written"] == trained["train_count"]
    assert data["num_shards"] == len(manifest["shards"])


def test_evaluation_is_the_last_eval_record(card, trained):
    records = [json.loads(line) for line in
               (trained["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "eval/zeroshot/top1" in r][-1]
    evaluation = card["training"]["evaluation"]
    assert evaluation["step"] == last["step"]
    assert evaluation["zeroshot/top1"] == last["eval/zeroshot/top1"]


def test_cost_and_markdown(card, exported, trained):
    from training.evaluation.loading import load_for_eval
    model = load_for_eval(str(trained["run_dir"])).model
    image = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    assert card["cost"]["image_params"] == image
    text = (exported / "README.md").read_text()
    training = card["training"]
    for fact in (f"step {training['step']} of {training['total_steps']}",
                 training["teacher"]["weights_sha256"], training["inheritance"]["weights_sha256"],
                 training["data"][0]["manifest_sha256"], f"{card['cost']['image_params']:,}"):
        assert fact in text
    for fmt, numbers in card["formats"].items():
        assert f"| {fmt} |" in text
        assert f"{numbers['parity']['image']['min_cosine']:.6f}" in text
