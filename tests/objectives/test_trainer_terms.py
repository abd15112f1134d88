"""The token-level terms (intermediate features, attribution alignment) wired through the trainer.

Real `python -m training` runs (training.cli.main, several in one worker process so the imports
are paid once: tests/helpers/clip_train_runs.py) of configs/tiny-distill.yaml on 16 stored-embedding
samples, one batch of 16 per step (every step sees the same images, so a term that is learned
falls step after step):
- `loss.terms.intermediate` + `loss.terms.attribution` (captions: all) with uncertainty balancing:
  both terms are logged by name in metrics.jsonl and fall; resumed from its step-2 checkpoint the
  run logs the uninterrupted run's losses (the balancer's log-variances are a checkpointed head);
- the same terms with K = 2 captions per image and attribution `captions: paired`;
- refused in one line (exit 2) before training: the attribution term with a teacher read from
  stored embeddings (no teacher model to give patch tokens), and an intermediate block pair
  naming a block the student does not have.
"""
from __future__ import annotations

import pytest

from tests.helpers.clip_train_runs import clip_train_runs
from tests.helpers.embeddings import SET_NAME, make_embedding_set
from tests.helpers.trainer import TINY_DISTILL, read_metrics, step_losses, tiny_overrides
from training.checkpoint import tag_for_step

STEPS = 4
TERMS = ["loss.affinity_weight=null", "loss.terms.affinity.weight=1.0",
         "loss.terms.intermediate={weight: 1.0, pairs: {image: [[1, 3]], text: [[1, 3]]}}"]
ATTRIBUTION_ALL = "loss.terms.attribution={weight: 1.0, captions: all}"
ATTRIBUTION_PAIRED = "loss.terms.attribution={weight: 1.0, captions: paired}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_terms")
    data = make_embedding_set(root / "data", train=16, samples_per_shard=16)

    def args(name, *extra, terms=TERMS):
        return ["--config", TINY_DISTILL,
                *tiny_overrides(data["train_shards"], root / name, steps=STEPS, batch_size=16),
                f"model.teacher_pretrained={data['teacher']}", "checkpoint.export_at_end=false",
                "optim.lr=2e-3", *terms, *extra]

    plan = {
        "balanced": args("balanced", ATTRIBUTION_ALL, "loss.balance=uncertainty",
                         "checkpoint.every_steps=2"),
        "resumed": args("resumed", ATTRIBUTION_ALL, "loss.balance=uncertainty",
                        f"checkpoint.resume={root / 'balanced' / 'checkpoints' / tag_for_step(2)}"),
        "k2_paired": args("k2_paired", ATTRIBUTION_PAIRED, "data.captions_per_image=2"),
        "stored": args("stored", ATTRIBUTION_PAIRED, "model.teacher_source=shards",
                       f"model.teacher_embeddings={SET_NAME}", terms=TERMS[:2]),
        "missing_block": args("missing_block", ATTRIBUTION_PAIRED,
                              "loss.terms.intermediate.pairs={image: [[5, 3]]}"),
    }
    return root, clip_train_runs(plan, root)


def assert_terms_logged_and_falling(run_dir, terms):
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for term in terms:  # by name, every step, without a hand-kept list in the trainer
        values = [r[term] for r in records]
        assert values[-1] < values[0] and sum(values[-2:]) / 2 < sum(values[:2]) / 2, (term, values)


@pytest.mark.slow
def test_intermediate_and_attribution_are_logged_by_name_and_fall(runs):
    root, results = runs
    assert results["balanced"]["status"] == 0
    assert_terms_logged_and_falling(root / "balanced", ["intermediate", "attribution", "affinity"])
    record = read_metrics(root / "balanced")[-1]  # uncertainty weighting's effective weights
    assert {"weight_intermediate", "weight_attribution", "weight_affinity"} <= set(record)


@pytest.mark.slow
def test_k2_captions_with_paired_attribution_maps(runs):
    root, results = runs
    assert results["k2_paired"]["status"] == 0
    assert_terms_logged_and_falling(root / "k2_paired", ["intermediate", "attribution"])


@pytest.mark.slow
def test_uncertainty_balanced_run_resumed_logs_the_uninterrupted_losses(runs):
    root, results = runs
    assert results["resumed"]["status"] == 0
    for key in ("loss", "intermediate", "attribution", "weight_attribution"):
        expected = {s: v for s, v in step_losses(root / "balanced", key).items() if s > 2}
        assert step_losses(root / "resumed", key) == expected, key


@pytest.mark.slow
@pytest.mark.parametrize("run, named", [
    ("stored", "loss.terms.attribution needs the teacher's image_patch_tokens"),
    ("missing_block", "loss.terms.intermediate.pairs.image: student block 5 does not exist")])
def test_refused_in_one_line_before_training(runs, run, named):
    root, results = runs
    result = results[run]
    assert result["status"] == 2
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result["stderr"]
    assert not (root / run / "metrics.jsonl").exists()
