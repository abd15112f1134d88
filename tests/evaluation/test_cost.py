"""Model cost: parameter counts per tower, MACs from torch's FLOP counter equal to a hand
count of the ViT/transformer matmuls, throughput's harmonic pairs/s."""
import pytest
import torch

from tests.helpers.evaluation import tiny_model
from training.evaluation.cost import (count_flops, macs_per_sample, model_cost,
                                      parameter_counts)


def transformer_macs(tokens, width, layers, mlp_ratio=4):
    """Hand count per sequence: qkv, out proj, MLP (tokens x weights) and QK^T, AV."""
    per_layer = tokens * (3 + 1 + 2 * mlp_ratio) * width * width + 2 * tokens * tokens * width
    return layers * per_layer


@pytest.mark.parametrize("name,width,layers", [("Tiny-ViT-Student", 64, 2),
                                               ("Tiny-ViT-Teacher", 128, 4)])
def test_macs_equal_hand_count(name, width, layers):
    model = tiny_model(name)
    patch, image, context, embed = 8, 64, 32, 64
    tokens = (image // patch) ** 2 + 1
    image_macs = ((image // patch) ** 2 * 3 * patch * patch * width      # patch embedding conv
                  + transformer_macs(tokens, width, layers) + width * embed)  # + projection
    text_macs = transformer_macs(context, width, layers) + width * embed
    assert macs_per_sample(model) == {"image_macs": image_macs, "text_macs": text_macs}


def test_counting_restores_attention_fast_path():
    before = torch.backends.mha.get_fastpath_enabled()
    count_flops(torch.matmul, torch.ones(2, 3), torch.ones(3, 4))
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert count_flops(torch.matmul, torch.ones(2, 3), torch.ones(3, 4)) == 2 * 2 * 3 * 4


def test_parameter_counts_per_tower():
    model = tiny_model("Tiny-ViT-Student")
    counts = parameter_counts(model)
    assert counts["image_params"] == sum(p.numel() for p in model.visual.parameters())
    assert counts["token_embedding_params"] == 49408 * 64
    assert counts["total_params"] == sum(p.numel() for p in model.parameters()) - 1  # logit_scale
    assert counts["text_params"] == counts["total_params"] - counts["image_params"]
    assert counts["text_params_no_token_embedding"] == (counts["text_params"] - 49408 * 64)


def test_throughput_is_measured_and_pairs_is_harmonic():
    cost = model_cost(tiny_model("Tiny-ViT-Student"), batch_size=4, warmup=1, iters=2)
    assert cost["images_per_s"] > 0 and cost["texts_per_s"] > 0
    assert 1 / cost["pairs_per_s"] == pytest.approx(1 / cost["images_per_s"]
                                                    + 1 / cost["texts_per_s"])
    assert cost["patch_size"] == 8 and cost["throughput_batch_size"] == 4


def test_fp16_on_cpu_is_refused_by_name():
    with pytest.raises(ValueError, match="'fp16' needs a GPU"):
        model_cost(tiny_model("Tiny-ViT-Student"), batch_size=2, precision="fp16")
