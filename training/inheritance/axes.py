"""Which structural axis each dimension of each open_clip tensor runs along.

Weight inheritance has to slice every tensor that shares an axis the same way: the residual
width of a tower appears in embeddings, every LayerNorm, every projection; one attention
head appears as a block of rows in q, k and v and a block of columns in the output
projection; a ResNet stage's output channels appear in every bottleneck's last conv and
BatchNorm (running statistics included) and in the next block's first conv. This module
names those axes once, so that selection (manual.py), importance (importance.py) and
pruning share one description instead of each re-deriving it from key patterns.

An axis is named by its *units*: "visual.hidden" (one unit = one channel),
"visual.transformer.resblocks.3.attn.heads" (one unit = one head of `head_dim` elements;
kind "qkv" is the same heads repeated for q, k and v), "visual.layer2.1.mid1" (the first
inner width of bottleneck 1 of stage 2). Unit names carry the model's own layer indices, so
the same renaming maps a student key and a student axis to the teacher's.
Supported towers: open_clip VisionTransformer, ModifiedResNet and the text transformer
(in CLIP at top level, or under `text.` in CustomTextCLIP).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

PLAIN, HEADS, QKV = "plain", "heads", "qkv"


@dataclass(frozen=True)
class Axis:
    units: str          # name of the set of units this dimension indexes
    kind: str = PLAIN   # PLAIN: one element per unit; HEADS: head_dim per unit; QKV: 3 x HEADS


class UnsupportedTensor(ValueError):
    """A state-dict key this module has no inheritance rule for (an exotic tower)."""


# Rules for one residual attention block, relative to "<tower>.transformer.resblocks.<i>.".
_BLOCK_RULES = {
    r"ln_[12]\.(weight|bias)": ["hidden"],
    r"ls_[12]\.gamma": ["hidden"],
    r"attn\.in_proj_weight": ["@qkv", "hidden"],
    r"attn\.in_proj_bias": ["@qkv"],
    r"attn\.out_proj\.weight": ["hidden", "@heads"],
    r"attn\.out_proj\.bias": ["hidden"],
    r"mlp\.c_fc\.weight": ["@mlp", "hidden"],
    r"mlp\.c_fc\.bias": ["@mlp"],
    r"mlp\.c_proj\.weight": ["hidden", "@mlp"],
    r"mlp\.c_proj\.bias": ["hidden"],
}
_VIT_RULES = {
    r"conv1\.weight": ["hidden", None, None, None],
    r"class_embedding": ["hidden"],
    r"positional_embedding": [None, "hidden"],
    r"ln_(pre|post)\.(weight|bias)": ["hidden"],
    r"proj": ["hidden", "=embed"],
}
_TEXT_RULES = {
    r"token_embedding\.weight": [None, "hidden"],
    r"positional_embedding": ["ctx", "hidden"],
    r"ln_final\.(weight|bias)": ["hidden"],
    r"text_projection": ["hidden", "=embed"],
    r"text_projection\.weight": ["=embed", "hidden"],
    r"text_projection\.bias": ["=embed"],
}
_BN = r"\.(weight|bias|running_mean|running_var)"


def _resnet_axes(rel: str) -> list | None:
    """Axes of a ModifiedResNet tensor (key relative to `visual.`), or None if unknown."""
    stem = {"1": ("stem1", None), "2": ("stem2", "stem1"), "3": ("stem3", "stem2")}
    if m := re.fullmatch(r"conv([123])\.weight", rel):
        out, inp = stem[m[1]]
        return [out, inp, None, None]
    if m := re.fullmatch(r"bn([123])" + _BN, rel):
        return [stem[m[1]][0]]
    if m := re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", rel):
        stage, block, rest = int(m[1]), int(m[2]), m[3]
        res = f"layer{stage}.res"
        mid = f"layer{stage}.{block}.mid"
        block_in = res if block > 0 else ("stem3" if stage == 1 else f"layer{stage - 1}.res")
        convs = {"conv1": [mid + "1", block_in], "conv2": [mid + "2", mid + "1"],
                 "conv3": [res, mid + "2"], "downsample.0": [res, block_in]}
        bns = {"bn1": mid + "1", "bn2": mid + "2", "bn3": res, "downsample.1": res}
        if (c := re.fullmatch(r"(conv[123]|downsample\.0)\.weight", rest)):
            return convs[c[1]] + [None, None]
        if (b := re.fullmatch(r"(bn[123]|downsample\.1)" + _BN, rest)):
            return [bns[b[1]]]
        return None
    if rel == "attnpool.positional_embedding":
        return [None, "layer4.res"]
    if m := re.fullmatch(r"attnpool\.([qkv])_proj\.(weight|bias)", rel):
        return ["@heads", "layer4.res"] if m[2] == "weight" else ["@heads"]
    if rel == "attnpool.c_proj.weight":
        return ["=embed", "@heads"]
    if rel == "attnpool.c_proj.bias":
        return ["=embed"]
    return None


def _resolve(names: list, tower: str, heads: str = "", mlp: str = "") -> list[Axis | None]:
    """Turn rule shorthands into Axis objects: '@x' names this block's units, '=x' is global."""
    axes = []
    for name in names:
        if name is None:
            axes.append(None)
        elif name == "@qkv":
            axes.append(Axis(heads, QKV))
        elif name == "@heads":
            axes.append(Axis(heads, HEADS))
        elif name == "@mlp":
            axes.append(Axis(mlp))
        elif name.startswith("="):
            axes.append(Axis(name[1:]))
        else:
            axes.append(Axis(f"{tower}.{name}"))
    return axes


def _match(rules: dict, rel: str):
    for pattern, names in rules.items():
        if re.fullmatch(pattern, rel):
            return names
    return None


def vision_kind(model: nn.Module) -> str:
    """'vit' or 'resnet': the two vision towers this module understands."""
    name = type(model.visual).__name__
    if name == "VisionTransformer":
        return "vit"
    if name == "ModifiedResNet":
        return "resnet"
    raise UnsupportedTensor(f"vision tower {name} is not supported (VisionTransformer or "
                            f"ModifiedResNet only)")


def text_prefix(model: nn.Module) -> str:
    """Where the text tower's keys live: '' in CLIP, 'text.' in CustomTextCLIP."""
    return "text." if hasattr(model, "text") else ""


def tensor_axes(key: str, vision: str, text: str = "") -> list[Axis | None]:
    """One entry per dimension of `key`: its Axis, or None where the size must match exactly.

    Raises UnsupportedTensor for a key without a rule, so that no tensor is silently copied
    with a wrong layout.
    """
    if key in ("logit_scale", "logit_bias") or key.endswith("num_batches_tracked"):
        return []
    if key.startswith("visual."):
        tower, rel = "visual", key[len("visual."):]
    elif key.startswith(text):
        tower, rel = "text", key[len(text):]
    else:
        raise UnsupportedTensor(f"no inheritance rule for tensor {key!r}")
    heads = mlp = ""
    if m := re.fullmatch(r"(transformer\.resblocks\.\d+)\.(.+)", rel):
        block = key[:len(key) - len(rel)] + m[1]
        names, heads, mlp = _match(_BLOCK_RULES, m[2]), f"{block}.attn.heads", f"{block}.mlp"
    elif tower == "visual" and vision == "resnet":
        names, heads = _resnet_axes(rel), "visual.attnpool.heads"
    elif tower == "visual":
        names = _match(_VIT_RULES, rel)
    else:
        names = _match(_TEXT_RULES, rel)
    if names is None:
        raise UnsupportedTensor(f"no inheritance rule for tensor {key!r}")
    return _resolve(names, tower, heads, mlp)


def model_axes(model: nn.Module) -> dict[str, list[Axis | None]]:
    """tensor_axes for every state-dict entry of an open_clip model."""
    vision, text = vision_kind(model), text_prefix(model)
    return {key: tensor_axes(key, vision, text) for key in model.state_dict()}


def head_dims(model: nn.Module) -> dict[str, int]:
    """Elements per head for every attention module, keyed by its heads-axis units name."""
    dims = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            dims[f"{name}.heads"] = module.head_dim
        elif type(module).__name__ == "AttentionPool2d":
            dims[f"{name}.heads"] = module.q_proj.out_features // module.num_heads
    return dims


def unit_counts(model: nn.Module) -> dict[str, int]:
    """Number of units on every axis of the model, read from its tensors' shapes.

    Checks that every tensor sharing an axis agrees on its size: a disagreement means the
    rules above are wrong for this model, which must fail here rather than mis-slice.
    """
    dims, counts, axes = head_dims(model), {}, model_axes(model)
    for key, tensor in model.state_dict().items():
        for size, axis in zip(tensor.shape, axes[key]):
            if axis is None:
                continue
            per_unit = {PLAIN: 1, HEADS: dims.get(axis.units, 1), QKV: 3 * dims.get(axis.units, 1)}
            n = size // per_unit[axis.kind]
            if counts.setdefault(axis.units, n) != n:
                raise UnsupportedTensor(f"axis {axis.units} has {counts[axis.units]} units "
                                        f"elsewhere but {n} in {key!r}")
    return counts


def element_index(axis: Axis, units: torch.Tensor, head_dim_teacher: int,
                  head_dim_student: int, teacher_count: int) -> torch.Tensor:
    """Teacher element indices along one dimension for the kept `units`, in student order.

    For heads, the first `head_dim_student` elements of each kept head are kept (TinyCLIP
    keeps head_dim fixed; a smaller one is sliced at the front). For qkv the same heads are
    taken from each of the q, k and v blocks of `teacher_count * head_dim_teacher` rows.
    """
    if axis.kind == PLAIN:
        return units
    within = torch.arange(head_dim_student)
    per_head = (units[:, None] * head_dim_teacher + within[None, :]).reshape(-1)
    if axis.kind == HEADS:
        return per_head
    block = teacher_count * head_dim_teacher
    return torch.cat([per_head + part * block for part in range(3)])
