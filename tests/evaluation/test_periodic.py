"""run_periodic_eval with the trainer's EvalConfig: only the configured sets, the same numbers
as clip-eval's tasks, the model's train/eval mode restored, a bf16 model handled."""
import pytest
import torch

from training.config import EvalConfig
from training.evaluation.periodic import run_periodic_eval
from training.evaluation.suite import eval_transform, run_retrieval


def test_only_configured_sets_and_same_numbers_as_the_task(model, spec, eval_sets):
    model.train()
    results = run_periodic_eval(model, EvalConfig(val=str(eval_sets["val"]), batch_size=6,
                                                  max_samples=11), None,
                                tokenizer=spec.tokenizer, preprocess_cfg=spec.preprocess_cfg)
    assert model.training, "the model's mode is restored"
    model.eval()
    assert set(results) == {f"val/{d}_{m}" for d in ("image_to_text", "text_to_image")
                            for m in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")}
    direct = run_retrieval(model, eval_sets["val"], tokenizer=spec.tokenizer,
                           transform=eval_transform(spec.preprocess_cfg), max_samples=11)
    assert direct["num_images"] == 11
    for key, value in results.items():
        assert value == direct[key.removeprefix("val/")]


def test_bf16_weights(eval_sets, spec):
    from tests.helpers.evaluation import tiny_model
    model = tiny_model().to(torch.bfloat16)
    from_spec = dict(tokenizer=spec.tokenizer, preprocess_cfg=spec.preprocess_cfg)
    results = run_periodic_eval(model, {"zeroshot": str(eval_sets["zeroshot"])}, None,
                                **from_spec)
    assert set(results) == {"zeroshot/top1", "zeroshot/top5", "zeroshot/mean_per_class_recall"}
    assert 0 <= results["zeroshot/top1"] <= results["zeroshot/top5"] <= 1
    reference = run_periodic_eval(tiny_model(), {"zeroshot": str(eval_sets["zeroshot"])}, None,
                                  **from_spec)
    assert results["zeroshot/top5"] == pytest.approx(reference["zeroshot/top5"], abs=0.15)
