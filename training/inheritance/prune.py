"""Prune a MaskedCLIP into a dense smaller CLIP, kept gate values folded into the weights.

With deterministic (eval) gates, every unit whose gate is 0 is dropped and every kept gate
value is multiplied into the weights that follow it (masked_clip.py's forward shows where), so
the pruned model computes what the masked model computes. The selection is expressed as an
InheritancePlan and cut out by manual.apply_plan: pruning is inheritance with gate-chosen units.

Two shape modes:
- "per_layer": each layer keeps its own heads and MLP neurons (what TinyCLIP does); exact.
  open_clip cannot express different head counts per layer, so the result is saved as
  pruned_config.json + weights and loaded by `load_pruned` (open_clip CLIP with per-layer
  attention and MLP modules swapped in; state-dict keys unchanged).
- "uniform": every layer of a tower keeps the same counts (the rounded mean over layers, top
  units by gate value), and the hidden width is heads x head_dim, as open_clip's blocks
  require. The result is a plain open_clip config that open_clip, clip_benchmark and timm
  users load as is. Approximate: it keeps some units the gates dropped and drops others.
Layers whose layer gate is 0 are removed in both modes.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from .. import models
from ..files import write_atomic, write_json_atomic
from .attention import self_attention
from .manual import InheritancePlan, apply_plan
from .masked_clip import TOWERS, MaskedCLIP, _blocks

PRUNED_CONFIG = "pruned_config.json"
MODES = ("per_layer", "uniform")


class PrunedAttention(nn.Module):
    """Self-attention whose inner width (heads x head_dim) differs from the residual width.

    Same parameter names as nn.MultiheadAttention and the call signature open_clip's
    ResidualAttentionBlock uses (batch-first inputs, returns (output, None)).
    """

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * heads * head_dim, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * heads * head_dim))
        self.out_proj = nn.Linear(heads * head_dim, width)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        return self_attention(self, q_x, attn_mask), None


@dataclass
class PrunedShape:
    """What a pruned model looks like: the open_clip config plus per-layer counts."""
    model_cfg: dict
    heads: dict[str, list[int]]      # tower -> heads per kept layer
    mlp: dict[str, list[int]]        # tower -> MLP neurons per kept layer
    head_dim: dict[str, int]

    def to_json(self) -> dict:
        return {"model_cfg": self.model_cfg, "heads": self.heads, "mlp": self.mlp,
                "head_dim": self.head_dim}


def _container(tower: str) -> str:
    return "visual.transformer.resblocks" if tower == "visual" else "transformer.resblocks"


def _top(values: torch.Tensor, tiebreak: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest gate values (log_alpha breaks ties), in ascending order."""
    return sorted(torch.topk(values + 1e-6 * torch.sigmoid(tiebreak), k).indices.tolist())


def _select(masked: MaskedCLIP, z: dict, mode: str) -> tuple[dict, dict]:
    """Depth map and kept units per teacher axis, from deterministic gate values."""
    depth, units = {}, {}
    for tower in TOWERS:
        g, zt = masked.gates[tower], z[tower]
        layers = [i for i in range(len(zt["layers"])) if zt["layers"][i] > 0]
        if not layers:
            raise ValueError(f"pruning: every layer of the {tower} tower is gated off")
        depth[_container(tower)] = layers
        heads = [(zt["heads"][i] > 0).nonzero().flatten().tolist() for i in layers]
        mlp = [(zt["mlp"][i] > 0).nonzero().flatten().tolist() for i in layers]
        hidden = (zt["hidden"] > 0).nonzero().flatten().tolist()
        if mode == "uniform":
            head_dim = _blocks(masked.clip, tower)[0].attn.head_dim
            k = max(1, round(sum(map(len, heads)) / len(layers)))
            m = max(1, round(sum(map(len, mlp)) / len(layers)))
            heads = [_top(zt["heads"][i], g.heads.log_alpha[i], k) for i in layers]
            mlp = [_top(zt["mlp"][i], g.mlp.log_alpha[i], m) for i in layers]
            hidden = _top(zt["hidden"], g.hidden.log_alpha, k * head_dim)
        if not hidden:
            raise ValueError(f"pruning: every hidden channel of the {tower} tower is gated off")
        units[f"{tower}.hidden"] = hidden
        for i, h, n in zip(layers, heads, mlp):
            units[f"{_container(tower)}.{i}.attn.heads"] = h
            units[f"{_container(tower)}.{i}.mlp"] = n
    return depth, units


@torch.no_grad()
def _fold_gates(masked: MaskedCLIP, z: dict) -> dict[str, torch.Tensor]:
    """The wrapped model's state dict with gate values multiplied into the following weights."""
    state = {k: v.detach().clone() for k, v in masked.clip.state_dict().items()}
    for tower in TOWERS:
        zt, zh = z[tower], z[tower]["hidden"]
        if tower == "visual":
            state["visual.ln_pre.weight"] *= zh
            state["visual.ln_pre.bias"] *= zh
        else:
            state["token_embedding.weight"] *= zh
            state["positional_embedding"] *= zh
        for i, block in enumerate(_blocks(masked.clip, tower)):
            p, g = f"{_container(tower)}.{i}.", zt["layers"][i] * zh
            head_cols = zt["heads"][i].repeat_interleave(block.attn.head_dim)
            state[p + "attn.out_proj.weight"] *= g[:, None] * head_cols[None, :]
            state[p + "attn.out_proj.bias"] *= g
            state[p + "mlp.c_proj.weight"] *= g[:, None] * zt["mlp"][i][None, :]
            state[p + "mlp.c_proj.bias"] *= g
    return state


def _shape(masked: MaskedCLIP, depth: dict, units: dict, mode: str) -> PrunedShape:
    cfg = copy.deepcopy(masked.model_cfg)
    heads, mlp, head_dim = {}, {}, {}
    for tower, key in (("visual", "vision_cfg"), ("text", "text_cfg")):
        layers = depth[_container(tower)]
        hd = _blocks(masked.clip, tower)[0].attn.head_dim
        width = len(units[f"{tower}.hidden"])
        heads[tower] = [len(units[f"{_container(tower)}.{i}.attn.heads"]) for i in layers]
        mlp[tower] = [len(units[f"{_container(tower)}.{i}.mlp"]) for i in layers]
        head_dim[tower] = hd
        section = cfg[key]
        section["width"], section["layers"] = width, len(layers)
        # int(width * mlp_ratio) must give the kept count; +0.5 guards against rounding down.
        section["mlp_ratio"] = (mlp[tower][0] + 0.5) / width
        if mode == "uniform":
            n_heads = heads[tower][0]
        else:  # built with one head, then the attention modules are swapped (load_pruned)
            n_heads = 1
        if tower == "visual":
            section["head_width"] = width // n_heads
        else:
            section["heads"] = n_heads
    return PrunedShape(cfg, heads, mlp, head_dim)


def build_pruned_model(shape: PrunedShape) -> nn.Module:
    """An open_clip CLIP of `shape`; per-layer head/MLP counts swapped in where they differ."""
    model = open_clip.model.CLIP(**shape.model_cfg)
    with warnings.catch_warnings():  # a layer may keep 0 heads or neurons: empty Linear init
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        _swap_blocks(model, shape)
    return model.eval()


def _swap_blocks(model: nn.Module, shape: PrunedShape) -> None:
    for tower in TOWERS:
        for i, block in enumerate(_blocks(model, tower)):
            width = block.ln_1.normalized_shape[0]
            heads, mlp = shape.heads[tower][i], shape.mlp[tower][i]
            if block.attn.num_heads != heads or block.attn.head_dim != shape.head_dim[tower]:
                block.attn = PrunedAttention(width, heads, shape.head_dim[tower])
            if block.mlp.c_fc.out_features != mlp:
                block.mlp.c_fc = nn.Linear(width, mlp)
                block.mlp.c_proj = nn.Linear(mlp, width)


def prune(masked: MaskedCLIP, mode: str = "per_layer") -> tuple[nn.Module, PrunedShape, InheritancePlan]:
    """The dense pruned model (eval mode), its shape and the plan that cut it out."""
    if mode not in MODES:
        raise ValueError(f"prune mode {mode!r} is not one of {MODES}")
    was_training = masked.training
    masked.eval()
    try:
        with torch.no_grad():
            z = masked.gate_values()
        depth, units = _select(masked, z, mode)
        shape = _shape(masked, depth, units, mode)
        pruned = build_pruned_model(shape)
        counts = {"embed": masked.clip.text_projection.shape[1],
                  "text.ctx": masked.clip.positional_embedding.shape[0]}
        units.update({name: list(range(n)) for name, n in counts.items()})
        head_dims = {a: [shape.head_dim[_tower_of(a)]] * 2 for a in units if a.endswith(".heads")}
        teacher_units = {a: _unit_count(masked, a) for a in units}
        plan = InheritancePlan("gates", f"gates-{mode}", depth, units, teacher_units, head_dims)
        state = apply_plan(_fold_gates(masked, z), pruned, plan)
        pruned.load_state_dict(state, strict=True)
    finally:
        masked.train(was_training)
    return pruned, shape, plan


def _tower_of(axis: str) -> str:
    return "visual" if axis.startswith("visual") else "text"


def _unit_count(masked: MaskedCLIP, axis: str) -> int:
    clip = masked.clip
    if axis == "embed":
        return clip.text_projection.shape[1]
    if axis == "text.ctx":
        return clip.positional_embedding.shape[0]
    block = _blocks(clip, _tower_of(axis))[0]
    if axis.endswith(".hidden"):
        return block.ln_1.normalized_shape[0]
    return block.attn.num_heads if axis.endswith(".heads") else block.mlp.c_fc.out_features


def save_pruned(model: nn.Module, shape: PrunedShape, out_dir: str | Path, name: str,
                preprocess_cfg: dict | None = None) -> Path:
    """Write a pruned model. Uniform shapes: open_clip's format (loads with
    `open_clip.create_model("local-dir:OUT")`; `preprocess_cfg` is the unpruned model's).
    Per-layer shapes: pruned_config.json + weights (load_pruned)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _is_uniform(shape):
        config_file = out_dir / f"{name}.json"
        config_file.write_text(json.dumps(shape.model_cfg, indent=2) + "\n")
        return models.export_open_clip(model, config_file, out_dir, preprocess_cfg)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # Weights first, config last and both atomically: the config is what marks the export done.
    write_atomic(out_dir / models.EXPORT_WEIGHTS_FILE,
                 lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_json_atomic(out_dir / PRUNED_CONFIG, shape.to_json(), indent=2)
    return out_dir


def _is_uniform(shape: PrunedShape) -> bool:
    return all(len(set(shape.heads[t])) == 1 and len(set(shape.mlp[t])) == 1 for t in TOWERS) \
        and shape.model_cfg["vision_cfg"]["width"] == shape.heads["visual"][0] * shape.head_dim["visual"] \
        and shape.model_cfg["text_cfg"]["width"] == shape.heads["text"][0] * shape.head_dim["text"]


def load_pruned(out_dir: str | Path) -> nn.Module:
    """A per-layer pruned model written by save_pruned."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    if not (out_dir / PRUNED_CONFIG).is_file():
        raise ValueError(f"{out_dir}: no {PRUNED_CONFIG}")
    data = json.loads((out_dir / PRUNED_CONFIG).read_text())
    model = build_pruned_model(PrunedShape(**data))
    model.load_state_dict(load_file(str(out_dir / models.EXPORT_WEIGHTS_FILE)), strict=True)
    return model


def export_pruned_student(state: dict[str, torch.Tensor], student: str, mask: dict,
                          out_dir: str | Path) -> Path:
    """A trained MaskedCLIP's state dict -> pruned (`mask["prune_mode"]`) and written to out_dir.

    The trainer's export of a `model.mask` run: the masked student is rebuilt from its config
    name, loaded strictly from the checkpoint's weights, pruned with deterministic gates and
    saved with save_pruned. The model name is derived from the pruned config, so two different
    shapes never share a name in open_clip's registry.
    """
    import hashlib

    from .masked_clip import build_masked_student

    masked = build_masked_student(student, None, mask["target_sparsity"],
                                  mask.get("start_sparsity", 0.0), mask.get("warmup_steps", 0))
    models.load_strict(masked, state, f"masked student of {student}")
    pruned, shape, _plan = prune(masked, mask.get("prune_mode", "uniform"))
    digest = hashlib.sha256(json.dumps(shape.to_json(), sort_keys=True).encode()).hexdigest()[:10]
    preprocess = dict(open_clip.get_model_preprocess_cfg(masked.clip))
    return save_pruned(pruned, shape, out_dir, f"pruned-{digest}", preprocess)
