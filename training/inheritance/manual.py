"""Manual weight inheritance: fill a smaller open_clip student from a teacher's tensors.

Two independent choices (docs/inheritance.md):
- depth: which teacher layer each student layer copies. "interval" is TinyCLIP's rule
  (every `teacher // student`-th layer, which degrades to the first k layers when the ratio
  is below 2); "uniform" spreads the kept layers evenly from the first to the last;
  "first" keeps the first k. ResNet stages always keep block 0 (it carries the downsample)
  and apply the rule to the remaining blocks.
- width: which units (channels, heads, MLP neurons) each axis keeps. "front" is TinyCLIP's
  slicing (the first n); "importance" keeps the n highest-scoring units, scores from
  importance.py (weight norm or activation statistics). Kept units stay in teacher order.
  The output embedding and the text context are always sliced at the front.

Every tensor sharing an axis is sliced with the same indices (axes.py names the axes), every
student tensor is filled, and the choice is returned as an InheritancePlan, which is what the
provenance record stores.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .axes import element_index, head_dims, tensor_axes, text_prefix, unit_counts, vision_kind

DEPTH_RULES = ("uniform", "interval", "first")
WIDTH_RULES = ("front", "importance")
ALWAYS_FRONT = ("embed", "text.ctx")  # projection outputs are not pruned; text positions are causal

_LAYER = re.compile(r"^(.*?(?:transformer\.resblocks|layer\d))\.(\d+)(?=\.)")


def select_layers(teacher_layers: int, student_layers: int, rule: str) -> list[int]:
    """Teacher layer index for each student layer under a depth rule."""
    t, s = teacher_layers, student_layers
    if s > t:
        raise ValueError(f"student has {s} layers, teacher only {t}")
    if rule == "interval":
        step = t // s
        return [i * step for i in range(s)]
    if rule == "uniform":
        # Evenly from first to last; for s == t this is the identity.
        return [0] if s == 1 else [int(i * (t - 1) / (s - 1) + 0.5) for i in range(s)]
    if rule == "first":
        return list(range(s))
    raise ValueError(f"depth rule {rule!r} is not one of {DEPTH_RULES}")


def layer_counts(state_dict_keys) -> dict[str, int]:
    """Number of layers in each layer container ('visual.transformer.resblocks', 'visual.layer3')."""
    counts: dict[str, int] = {}
    for key in state_dict_keys:
        if m := _LAYER.match(key):
            counts[m[1]] = max(counts.get(m[1], 0), int(m[2]) + 1)
    return counts


def rename_layers(name: str, depth: dict[str, list[int]]) -> str:
    """A student key or axis name with its layer index replaced by the teacher's."""
    m = _LAYER.match(name)
    if not m:
        return name
    return f"{m[1]}.{depth[m[1]][int(m[2])]}{name[m.end():]}"


@dataclass
class InheritancePlan:
    """What the student takes from the teacher; JSON-serialisable via asdict()."""
    depth_rule: str
    width_rule: str
    depth: dict[str, list[int]]                     # container -> teacher layer per student layer
    units: dict[str, list[int]]                     # teacher axis -> kept teacher units
    teacher_units: dict[str, int]                   # teacher axis -> teacher unit count
    head_dims: dict[str, list[int]] = field(default_factory=dict)  # heads axis -> [teacher, student]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "InheritancePlan":
        return cls(**data)


def _check_same_family(teacher: nn.Module, student: nn.Module) -> None:
    if vision_kind(teacher) != vision_kind(student):
        raise ValueError(f"teacher vision tower is {vision_kind(teacher)}, student's is "
                         f"{vision_kind(student)}: inheritance needs the same family")
    if text_prefix(teacher) != text_prefix(student):
        raise ValueError("teacher and student differ in text tower layout (CLIP vs CustomTextCLIP)")


def _depth_map(teacher: nn.Module, student: nn.Module, rule: str) -> dict[str, list[int]]:
    t_counts = layer_counts(teacher.state_dict())
    depth = {}
    for container, n in layer_counts(student.state_dict()).items():
        if container not in t_counts:
            raise ValueError(f"teacher has no layers {container!r}")
        if n > t_counts[container]:
            raise ValueError(f"student is larger than the teacher on {container}: {n} layers > "
                             f"{t_counts[container]}")
        if re.search(r"layer\d$", container):  # ResNet stage: block 0 holds the downsample
            depth[container] = [0] + [1 + i for i in select_layers(t_counts[container] - 1, n - 1, rule)]
        else:
            depth[container] = select_layers(t_counts[container], n, rule)
    return depth


def _select_units(axis: str, n_teacher: int, n_student: int, width: str,
                  scores: dict[str, torch.Tensor] | None) -> list[int]:
    if n_student > n_teacher:
        raise ValueError(f"student is larger than the teacher on {axis}: {n_student} > {n_teacher}")
    if width == "front" or axis in ALWAYS_FRONT:
        return list(range(n_student))
    if scores is None or axis not in scores:
        raise ValueError(f"width rule 'importance' needs scores for axis {axis!r}")
    kept = torch.topk(scores[axis].float(), n_student, sorted=False).indices
    return sorted(kept.tolist())


def plan_inheritance(teacher: nn.Module, student: nn.Module, depth: str = "uniform",
                     width: str = "front",
                     scores: dict[str, torch.Tensor] | None = None) -> InheritancePlan:
    """Choose the teacher layers and units the student keeps; raises ValueError on a misfit."""
    if width not in WIDTH_RULES:
        raise ValueError(f"width rule {width!r} is not one of {WIDTH_RULES}")
    _check_same_family(teacher, student)
    depth_map = _depth_map(teacher, student, depth)
    t_counts, t_dims, s_dims = unit_counts(teacher), head_dims(teacher), head_dims(student)
    units, dims = {}, {}
    for s_axis, n in unit_counts(student).items():
        axis = rename_layers(s_axis, depth_map)
        if axis not in t_counts:
            raise ValueError(f"teacher has no axis {axis!r} (student axis {s_axis!r})")
        units[axis] = _select_units(axis, t_counts[axis], n, width, scores)
        if s_axis in s_dims:
            if s_dims[s_axis] > t_dims[axis]:
                raise ValueError(f"student head width {s_dims[s_axis]} > teacher's {t_dims[axis]} "
                                 f"on {axis}")
            dims[axis] = [t_dims[axis], s_dims[s_axis]]
    return InheritancePlan(depth, width, depth_map, units,
                           {a: t_counts[a] for a in units}, dims)


def apply_plan(teacher_state: dict[str, torch.Tensor], student: nn.Module,
               plan: InheritancePlan) -> dict[str, torch.Tensor]:
    """The student's full state dict cut out of the teacher's by `plan`.

    Checks every tensor's resulting shape against the student's own, so a plan that does
    not fit (different patch size, vocabulary, image size) fails with the tensor's name.
    """
    vision, text = vision_kind(student), text_prefix(student)
    out = {}
    for key, target in student.state_dict().items():
        t_key = rename_layers(key, plan.depth)
        if t_key not in teacher_state:
            raise ValueError(f"teacher state dict has no tensor {t_key!r} for student {key!r}")
        tensor = teacher_state[t_key]
        for dim, axis in enumerate(tensor_axes(t_key, vision, text)):
            if axis is None:
                continue
            hd_t, hd_s = plan.head_dims.get(axis.units, [1, 1])
            index = element_index(axis, torch.tensor(plan.units[axis.units], dtype=torch.long),
                                  hd_t, hd_s, plan.teacher_units[axis.units])
            tensor = tensor.index_select(dim, index.to(tensor.device))
        if tensor.shape != target.shape:
            raise ValueError(f"{key}: teacher gives shape {tuple(tensor.shape)}, student needs "
                             f"{tuple(target.shape)} (sizes that must match differ)")
        out[key] = tensor.detach().to(dtype=target.dtype).clone().contiguous()
    return out


def inherit(teacher: nn.Module, student: nn.Module, depth: str = "uniform", width: str = "front",
            scores: dict[str, torch.Tensor] | None = None) -> InheritancePlan:
    """Fill `student` in place from `teacher`; returns the plan (see module docstring)."""
    plan = plan_inheritance(teacher, student, depth, width, scores)
    state = apply_plan(teacher.state_dict(), student, plan)
    missing, unexpected = student.load_state_dict(state, strict=True)
    assert not missing and not unexpected  # strict=True raises first; kept as the invariant
    return plan
