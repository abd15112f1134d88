"""attention.py, the one attention forward of masks, pruning and importance, against torch's own."""
import pytest
import torch
from torch import nn

from training.inheritance.attention import head_outputs, project_heads, self_attention
from training.inheritance.prune import PrunedAttention


def _mha(width=32, heads=4, seed=0):
    torch.manual_seed(seed)
    attn = nn.MultiheadAttention(width, heads, batch_first=True).eval()
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    return attn


@pytest.mark.parametrize("mask_kind", [None, "float", "bool"])
def test_self_attention_is_multihead_attention(mask_kind):
    attn, x = _mha(), torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # True: not allowed (torch's MHA rule)
    mask = {None: None, "bool": causal,
            "float": torch.zeros(7, 7).masked_fill(causal, float("-inf"))}[mask_kind]
    with torch.no_grad():
        want, _ = attn(x, x, x, need_weights=False, attn_mask=mask)
        got = self_attention(attn, x, mask)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


def test_head_gates_and_per_head_outputs():
    attn, x = _mha(), torch.randn(2, 5, 32)
    gate = torch.tensor([1.0, 0.0, 0.5, 0.0])
    with torch.no_grad():
        o = head_outputs(x, attn.in_proj_weight, attn.in_proj_bias, 4, 8)
        assert o.shape == (2, 4, 5, 8)
        # the gated output is the sum of each head's output through its own columns
        w = attn.out_proj.weight.reshape(32, 4, 8)
        per_head = torch.einsum("nhld,whd->nlhw", o, w)
        want = (per_head * gate.view(1, 1, 4, 1)).sum(dim=2) + attn.out_proj.bias
        got = project_heads(o, attn.out_proj.weight, attn.out_proj.bias, gate)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(self_attention(attn, x, head_gate=gate), got)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_pruned_attention_without_heads_is_its_bias():
    attn = PrunedAttention(16, 0, 8)
    with torch.no_grad():
        attn.out_proj.bias.normal_()
    out, weights = attn(torch.randn(2, 3, 16))
    assert weights is None and torch.equal(out, attn.out_proj.bias.expand(2, 3, 16))
