"""The masked student of automatic inheritance: an open_clip CLIP with L0 gates on its structure.

Gates per transformer tower ("visual", "text"): `hidden` (one per residual channel, shared by
all layers), `heads` (layers x heads), `mlp` (layers x MLP neurons) and `layers` (one per
block: the reference leaves whole layers out). The forward is open_clip's, re-written so the
gates act where CoFi puts them, in a form that pruning can fold into the weights exactly:

    x = maskedLN_pre(embed(images)) * z_hidden            (text: (tokens + pos) * z_hidden)
    x = x + z_layer * z_hidden * (W_out (z_head . attention(maskedLN_1(x))) + b_out)
    x = x + z_layer * z_hidden * (W_2 (z_mlp . gelu(W_1 maskedLN_2(x) + b_1)) + b_2)
    out = maskedLN_post(x) @ proj

maskedLN normalises over the channels whose hidden gate is non-zero and zeroes the others, as
a LayerNorm of the pruned (narrower) model would. The wrapped open_clip model keeps its own
parameters and state-dict keys, so inheritance into it and pruning out of it use the same
names. As a TrainingHooks (training/task.py) it declares the Lagrangian term the trainer adds to
the loss (`regularization`), its metrics and the gates' own optimizer group (`extra_param_groups`).

Supported: open_clip CLIP with a VisionTransformer (class-token pooling, no patch dropout, no
attentional pooler) and the standard text tower. ModifiedResNet students are not supported here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..task import TrainingHooks
from .attention import self_attention
from .hard_concrete import HardConcreteGate, LagrangianConstraint

TOWERS = ("visual", "text")


def _masked_layer_norm(ln: nn.LayerNorm, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the kept channels only (keep: 0/1 float per channel); others are 0."""
    n = keep.sum().clamp_min(1.0)
    mean = (x * keep).sum(-1, keepdim=True) / n
    centred = (x - mean) * keep
    var = (centred * centred).sum(-1, keepdim=True) / n
    return (centred * torch.rsqrt(var + ln.eps) * ln.weight + ln.bias) * keep


class TowerGates(nn.Module):
    """The four gate groups of one transformer tower."""

    def __init__(self, width: int, layers: int, heads: int, mlp: int):
        super().__init__()
        self.hidden = HardConcreteGate(width)
        self.heads = HardConcreteGate(layers, heads)
        self.mlp = HardConcreteGate(layers, mlp)
        self.layers = HardConcreteGate(layers)


def _blocks(model: nn.Module, tower: str) -> nn.ModuleList:
    return (model.visual.transformer if tower == "visual" else model.transformer).resblocks


def _tower_shape(model: nn.Module, tower: str) -> tuple[int, int, int, int]:
    blocks = _blocks(model, tower)
    attn = blocks[0].attn
    return attn.embed_dim, len(blocks), attn.num_heads, blocks[0].mlp.c_fc.out_features


def _check_supported(model: nn.Module) -> None:
    visual = model.visual
    if type(visual).__name__ != "VisionTransformer" or hasattr(model, "text"):
        raise ValueError("automatic inheritance supports open_clip CLIP with a VisionTransformer "
                         "and the built-in text tower only")
    if visual.attn_pool is not None or not isinstance(visual.patch_dropout, nn.Identity) \
            or visual.pool_type != "tok" or visual.final_ln_after_pool \
            or getattr(model, "text_pool_type", "argmax") != "argmax":
        raise ValueError("automatic inheritance: the vision tower must use class-token pooling "
                         "without patch dropout or an attentional pooler, text argmax pooling")


class MaskedCLIP(nn.Module, TrainingHooks):
    """Wraps an open_clip CLIP (`self.clip`, weights untouched) with gates and the constraint.

    `lr`: the constant rate of the gates and multipliers (model.mask.lr), their optimizer group."""

    def __init__(self, clip: nn.Module, model_cfg: dict, target_sparsity: float,
                 start_sparsity: float = 0.0, warmup_steps: int = 0, *, lr: float = 0.05):
        super().__init__()
        _check_supported(clip)
        self.clip, self.model_cfg, self.mask_lr = clip, model_cfg, lr
        self.gates = nn.ModuleDict({t: TowerGates(*_tower_shape(clip, t)) for t in TOWERS})
        self.constraint = LagrangianConstraint(target_sparsity, start_sparsity, warmup_steps)
        self.output_dict = True

    # ---- gates -------------------------------------------------------------------------------
    def gate_values(self) -> dict[str, dict[str, torch.Tensor]]:
        """z for every gate group (sampled in training, deterministic in eval)."""
        for gate in self.modules():
            if isinstance(gate, HardConcreteGate):
                gate.clamp()
        return {t: {name: gate() for name, gate in self.gates[t].named_children()} for t in TOWERS}

    def prunable_params(self) -> float:
        """Attention + MLP weights of both towers: what sparsity is measured against."""
        total = 0
        for tower in TOWERS:
            width, layers, heads, mlp = _tower_shape(self.clip, tower)
            head_dim = width // heads
            total += layers * (4 * width * heads * head_dim + 2 * width * mlp)
        return float(total)

    def expected_params(self) -> torch.Tensor:
        """Expected remaining prunable weights from the gates' probabilities of being non-zero."""
        total = 0
        for tower in TOWERS:
            g = self.gates[tower]
            head_dim = _tower_shape(self.clip, tower)[0] // g.heads.log_alpha.shape[1]
            hidden = g.hidden.prob_nonzero().sum()
            layer = g.layers.prob_nonzero()
            attn = 4 * head_dim * hidden * g.heads.prob_nonzero().sum(dim=1)
            mlp = 2 * hidden * g.mlp.prob_nonzero().sum(dim=1)
            total = total + (layer * (attn + mlp)).sum()
        return total

    def expected_sparsity(self) -> torch.Tensor:
        return 1.0 - self.expected_params() / self.prunable_params()

    # ---- TrainingHooks -----------------------------------------------------------------------
    def regularization(self, step: int) -> dict[str, torch.Tensor]:
        """The trainer adds these to the loss: the Lagrangian sparsity constraint."""
        return {"lagrangian": self.constraint(self.expected_sparsity(), step)}

    @torch.no_grad()
    def metrics(self, step: int) -> dict[str, torch.Tensor]:
        """What the trainer logs each step: expected and target sparsity, the multipliers."""
        lambdas = self.constraint.lambdas.detach().float()
        return {"mask/expected_sparsity": self.expected_sparsity().detach().float(),
                "mask/target_sparsity": torch.tensor(self.constraint.target_at(step)),
                "mask/lambda1": lambdas[0], "mask/lambda2": lambdas[1]}

    def extra_param_groups(self) -> list[dict]:
        """The gates and the Lagrange multipliers: a constant rate, no weight decay (CoFi and
        TinyCLIP train them with an optimizer of their own and no schedule: the constraint's
        target has its own warm-up)."""
        params = [*self.gates.parameters(), *self.constraint.parameters()]
        return [{"name": "mask", "params": params, "lr": self.mask_lr, "weight_decay": 0.0,
                 "schedule": "constant"}]

    # ---- forward -----------------------------------------------------------------------------
    def _block(self, block: nn.Module, x: torch.Tensor, keep: torch.Tensor, z: dict,
               i: int, mask: torch.Tensor | None) -> torch.Tensor:
        branch_gate = z["layers"][i] * z["hidden"]
        h = _masked_layer_norm(block.ln_1, x, keep)
        x = x + branch_gate * self_attention(block.attn, h, mask, head_gate=z["heads"][i])
        h = _masked_layer_norm(block.ln_2, x, keep)
        a = block.mlp.gelu(block.mlp.c_fc(h)) * z["mlp"][i]
        return x + branch_gate * block.mlp.c_proj(a)

    def _tower(self, tower: str, x: torch.Tensor, z: dict, mask: torch.Tensor | None):
        keep = (z["hidden"] > 0).to(x.dtype)
        for i, block in enumerate(_blocks(self.clip, tower)):
            x = self._block(block, x, keep, z, i, mask)
        return x, keep

    def encode_image(self, images: torch.Tensor, z: dict | None = None,
                     normalize: bool = False) -> torch.Tensor:
        z = z or self.gate_values()["visual"]
        visual = self.clip.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        keep = (z["hidden"] > 0).to(x.dtype)
        x = _masked_layer_norm(visual.ln_pre, x, keep) * z["hidden"]
        x, keep = self._tower("visual", x, z, None)
        pooled = _masked_layer_norm(visual.ln_post, x[:, 0], keep) @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(self, texts: torch.Tensor, z: dict | None = None,
                    normalize: bool = False) -> torch.Tensor:
        z = z or self.gate_values()["text"]
        clip = self.clip
        x = (clip.token_embedding(texts) + clip.positional_embedding) * z["hidden"]
        mask = clip.attn_mask.to(x.dtype) if clip.attn_mask is not None else None
        x, keep = self._tower("text", x, z, mask)
        x = _masked_layer_norm(clip.ln_final, x, keep)
        pooled = x[torch.arange(x.shape[0]), texts.argmax(dim=-1)] @ clip.text_projection
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def forward(self, images: torch.Tensor | None = None, texts: torch.Tensor | None = None):
        z = self.gate_values()
        out = {"logit_scale": self.clip.logit_scale.exp()}
        if images is not None:
            out["image_features"] = self.encode_image(images, z["visual"], normalize=True)
        if texts is not None:
            out["text_features"] = self.encode_text(texts, z["text"], normalize=True)
        return out


def build_masked_student(name_or_json: str, init_state_dict: str | dict | None,
                         target_sparsity: float,
                         start_sparsity: float = 0.0, warmup_steps: int = 0, *,
                         lr: float = 0.05) -> MaskedCLIP:
    """A MaskedCLIP around a student built from its spec (e.g. from clip-inherit weights)."""
    from ..specs import build_student

    clip, spec = build_student(name_or_json, init_state_dict)
    return MaskedCLIP(clip, spec.model_cfg, target_sparsity, start_sparsity, warmup_steps, lr=lr)
