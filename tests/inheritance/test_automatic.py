"""Automatic inheritance: hard-concrete gates, the Lagrangian, the masked model, pruning."""
import copy

import open_clip
import pytest
import torch

from tests.helpers.inheritance import inputs, model
from training.inheritance.hard_concrete import HardConcreteGate, LagrangianConstraint
from training.inheritance.masked_clip import MaskedCLIP
from training.inheritance.prune import load_pruned, prune, save_pruned

NAME = "Tiny-ViT-Teacher"
OFF, ON_LOW, ON_HIGH = -4.6, 0.5, 4.6  # log_alpha: gate 0 / gate strictly inside (0, 1]


def masked(target=0.5, warmup=0):
    return MaskedCLIP(model(NAME), open_clip.get_model_config(NAME), target, warmup_steps=warmup)


def test_gate_distribution():
    gate = HardConcreteGate(1000)
    assert torch.all(gate.deterministic() == 1.0)          # log_alpha 10: fully open
    gate.clamp()
    assert gate.log_alpha.max().item() == pytest.approx(4.60517, abs=1e-4)
    samples = gate.sample()
    assert samples.min() >= 0 and samples.max() <= 1 and (samples == 1).float().mean() > 0.5
    with torch.no_grad():
        gate.log_alpha.fill_(OFF)
    assert torch.all(gate.deterministic() == 0) and gate.prob_nonzero().max() < 0.05
    # P(z != 0) agrees with sampling (a Monte-Carlo check of the closed form)
    with torch.no_grad():
        gate.log_alpha.fill_(0.3)
    assert (gate.sample() > 0).float().mean().item() == pytest.approx(gate.prob_nonzero()[0].item(), abs=0.05)


def test_lagrangian_multipliers_ascend_and_target_warms_up():
    constraint = LagrangianConstraint(target=0.6, warmup_steps=10)
    assert [constraint.target_at(s) for s in (0, 5, 10, 50)] == [0.0, 0.3, 0.6, 0.6]
    opt = torch.optim.AdamW(constraint.parameters(), lr=0.1, weight_decay=0)
    loss = constraint(torch.tensor(0.1), step=10)  # expected sparsity below target
    loss.backward()
    opt.step()
    assert constraint.lambdas[0] > 0 and constraint.lambdas[1] > 0  # ascent: the penalty grows


def test_open_gates_reproduce_open_clip():
    m = masked().eval()
    images, texts = inputs()
    with torch.no_grad():
        out, ref = m(images, texts), m.clip(images, texts)
    assert torch.allclose(out["image_features"], ref[0], atol=1e-5)
    assert torch.allclose(out["text_features"], ref[1], atol=1e-5)


def test_expected_sparsity_reaches_the_target():
    m = masked(target=0.5, warmup=100)
    gates = [p for n, p in m.named_parameters() if n.startswith("gates")]
    opt = torch.optim.AdamW([{"params": gates}, {"params": [m.constraint.lambdas]}],
                            lr=0.1, betas=(0.5, 0.9), weight_decay=0)
    history = []
    for step in range(300):
        loss = m.regularization(step)["lagrangian"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(m.expected_sparsity().item())
    assert history[0] < 0.05
    assert all(abs(s - 0.5) < 0.03 for s in history[-50:]), history[-50:]


def _set_gates(m, seed=0, uniform=False):
    """Deterministic gates with zeros in every group (and one whole layer off per tower)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tower in ("visual", "text"):
            gates = m.gates[tower]
            for gate in gates.children():
                gate.log_alpha.uniform_(ON_LOW, ON_HIGH, generator=g)
            layers, heads = gates.heads.log_alpha.shape
            if uniform:
                gates.heads.log_alpha[:, 1:] = OFF                     # 1 head x 32 kept per layer
                gates.hidden.log_alpha[32:] = OFF                      # hidden = 1 x head_dim
                gates.mlp.log_alpha[:, ::2] = OFF
            else:
                gates.heads.log_alpha[0, 1:] = OFF
                gates.heads.log_alpha[2, :] = OFF
                gates.hidden.log_alpha[torch.randperm(128, generator=g)[:40]] = OFF
                gates.mlp.log_alpha[torch.rand(gates.mlp.log_alpha.shape, generator=g) < 0.4] = OFF
                gates.layers.log_alpha[1] = OFF


def _features(module, images, texts):
    with torch.no_grad():
        out = module(images, texts)
    return (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]


def test_per_layer_pruned_model_equals_masked_model(tmp_path):
    m = masked()
    _set_gates(m)
    m.eval()
    pruned, shape, plan = prune(m, "per_layer")
    assert plan.depth["visual.transformer.resblocks"] == [0, 2, 3]
    assert shape.heads["visual"] == [1, 0, len(plan.units["visual.transformer.resblocks.3.attn.heads"])]
    # 88 channels are not OFF; the eval rule also drops the expected number of zeros (CoFi).
    kept = int((m.gates["visual"].hidden.deterministic() > 0).sum())
    assert shape.model_cfg["vision_cfg"]["width"] == kept and 80 <= kept <= 88
    images, texts = inputs()
    for got, want in zip(_features(pruned, images, texts), _features(m, images, texts)):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in m.clip.parameters())
    save_pruned(pruned, shape, tmp_path, "pruned")
    reloaded = load_pruned(tmp_path)
    for got, want in zip(_features(reloaded, images, texts), _features(pruned, images, texts)):
        assert torch.equal(got, want)


def test_uniform_export_loads_back_through_open_clip(tmp_path):
    m = masked()
    _set_gates(m, uniform=True)
    m.eval()
    pruned, shape, _ = prune(m, "uniform")
    cfg = shape.model_cfg
    assert cfg["vision_cfg"]["width"] == 32 and cfg["vision_cfg"]["head_width"] == 32
    assert cfg["text_cfg"]["heads"] == 1 and shape.mlp["visual"] == [256] * 4
    images, texts = inputs()
    # These gates are uniform already, so the uniform model is exact too.
    for got, want in zip(_features(pruned, images, texts), _features(m, images, texts)):
        assert torch.allclose(got, want, atol=1e-5)
    out = save_pruned(pruned, shape, tmp_path, "Uniform-Pruned")
    assert (out / "open_clip_config.json").is_file()
    loaded = open_clip.create_model(f"local-dir:{out}").eval()
    for got, want in zip(_features(loaded, images, texts), _features(pruned, images, texts)):
        assert torch.equal(got, want)


def test_uniform_mode_on_irregular_gates_is_a_plain_open_clip_shape():
    m = masked()
    _set_gates(m, seed=3)
    pruned, shape, _ = prune(m, "uniform")
    assert len(set(shape.heads["visual"])) == 1 and len(set(shape.mlp["text"])) == 1
    rebuilt = open_clip.model.CLIP(**copy.deepcopy(shape.model_cfg))
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
