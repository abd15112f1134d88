"""Distributed evaluation (2 torchrun ranks, gloo on CPU) gives the single-process numbers:
through the trainer's periodic evaluation, and through `clip-eval eval` under torchrun."""
import json

import pytest

from tests.helpers.torchrun import run_torchrun
from training.evaluation.loading import load_for_eval
from training.evaluation.periodic import run_periodic_eval
from training.evaluation.report import read_metrics


def same_numbers(distributed: dict, single: dict):
    assert distributed.keys() == single.keys()
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
def test_trainer_periodic_eval_on_2_ranks_equals_single_process(trained_run):
    run = read_metrics(trained_run["run_dir"])
    eval_keys = [k for k in run.series if k.startswith("eval/")]
    assert run.series["eval/zeroshot/top1"][0] == [4, 8]       # every 4 steps, and at the end
    distributed = {k.removeprefix("eval/"): run.last(k) for k in eval_keys}

    exported = load_for_eval(str(trained_run["run_dir"] / "export"))
    single = run_periodic_eval(exported.model, {"zeroshot": str(trained_run["zeroshot"]),
                                                "val": str(trained_run["val"]), "batch_size": 64},
                               tokenizer=exported.spec.tokenizer,
                               preprocess_cfg=exported.spec.preprocess_cfg)
    same_numbers(distributed, single)
    assert len(single) == 13


@pytest.mark.slow
def test_clip_eval_under_torchrun_equals_single_process(tmp_path, eval_sets, model):
    from training.evaluation.cli import main
    from training.models import export_open_clip

    export = export_open_clip(model, "Tiny-ViT-Student", tmp_path / "export")
    # --max-samples makes both ranks walk all shards and keep alternate samples (the trainer
    # test above covers whole shards per rank); 7 classes split 4 + 3 across the ranks.
    args = ["eval", "--checkpoint", str(export), "--zeroshot", str(eval_sets["zeroshot"]),
            "--retrieval", str(eval_sets["val"]), "--batch-size", "5", "--max-samples", "23"]
    run_torchrun(["-m", "training.evaluation", *args, "--out", str(tmp_path / "dist.json")],
                 nproc=2, timeout=300)
    assert main([*args, "--out", str(tmp_path / "single.json")]) == 0
    dist, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dist", "single"))
    assert (dist["world_size"], single["world_size"]) == (2, 1)
    for task in ("zeroshot", "retrieval"):
        same_numbers(dist[task], single[task])
    assert single["retrieval"]["num_texts"] == 5 * 23 and single["zeroshot"]["num_images"] == 23
