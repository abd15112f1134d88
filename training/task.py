"""The distillation task: the one module the engine wraps (timm's FeatureDistillationTrainableModule).

    task = DistillationTask(student, heads={"projection": FeatureProjection(64, 512)},
                            token_outputs=["image_patch_tokens"])   # training/tokens.py keys
    out = task(images, texts)          # the student's outputs (+ token-level ones), plus what each head adds
    task.param_groups(weight_decay)    # AdamW groups, the heads' and the student's own included
                                       # (+ named groups with their own rate: optim.param_groups)
    task.regularization(step), task.metrics(step)
    DistillationTask.student_state(state_dict)   # the student's weights alone, for export

It owns the student and every trainable part that is not the student (the feature projection now;
loss balancers, dense heads as they come), so the engine optimises, checkpoints and (under
ZeRO-3) partitions all of them as one module. The trainer talks to it only through the methods
above. Parts declare what they need through `TrainingHooks` (regularizers, metrics, optimizer
groups of their own); a head is a `TaskHead`: it reads the student's outputs and adds entries to
them (e.g. `image_features_projected`), which the loss reads by name.

State-dict layout (checkpoints): `student.<the student's own keys>`, `heads.<name>.<keys>`.
Non-parameter state a part needs after a resume (e.g. a balancer's running means) goes through
torch's `get_extra_state` / `set_extra_state`, so it rides in the same state dict.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from training.text_prefix import encode_used_tokens
from training.tokens import TokenCapture

STUDENT_PREFIX = "student."


class TrainingHooks:
    """What a student or a head may declare to the task, instead of duck-typed attributes.

    Every method has a do-nothing default; a module overrides what it needs. The task collects
    the hooks of every submodule that is an instance of this class (`isinstance`, not getattr).
    """

    def regularization(self, step: int) -> dict[str, torch.Tensor]:
        """Batch-independent loss terms for optimizer step `step` (added once per step, logged
        as loss_<name>)."""
        return {}

    def metrics(self, step: int) -> dict[str, torch.Tensor]:
        """Scalars to log after step `step` (detached)."""
        return {}

    def extra_param_groups(self) -> list[dict]:
        """Optimizer groups with their own settings, e.g. {"name": "mask", "params": [...],
        "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"}. Their parameters are left out
        of the default decay / no-decay groups. "schedule" is "constant" or "model" (warm-up +
        cosine like the model's groups)."""
        return []


class TaskHead(TrainingHooks, nn.Module):
    """A trainable part of the task that is not the student: reads the student's outputs and
    returns entries to add to them (per-sample entries are [batch, ...] tensors).
    `token_inputs`: the token-level outputs (training/tokens.py keys) it reads, which the task
    then captures from the student's forward."""

    token_inputs: tuple[str, ...] = ()

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class FeatureProjection(TaskHead):
    """A learned linear map from the student's embedding width to the teacher's, for feature
    distillation between models of different widths. Adds `image_features_projected` and
    `text_features_projected`, which the loss's feature term prefers when present."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.linear.weight.dtype
        return {f"{kind}_projected": self.linear(outputs[kind].to(dtype))
                for kind in ("image_features", "text_features")}


class DistillationTask(nn.Module):
    """The student and its trainable heads, as one module for the engine."""

    def __init__(self, student: nn.Module, heads: Mapping[str, TaskHead] | None = None,
                 token_outputs: Iterable[str] = ()):
        super().__init__()
        self.student = student
        self.heads = nn.ModuleDict(dict(heads or {}))
        keys = set(token_outputs) | {k for head in self.heads.values() for k in head.token_inputs}
        self.capture = TokenCapture(student, keys, who="student") if keys else None

    def forward(self, images: torch.Tensor | None, texts: torch.Tensor | None,
                text_features: torch.Tensor | None = None,
                text_length: int | None = None) -> dict[str, torch.Tensor]:
        """The student's outputs (open_clip's dict: image_features, text_features, 0-dim
        logit_scale), the token-level outputs asked for (`token_outputs` and the heads'
        `token_inputs`, captured inside the student's forward: training/tokens.py), plus every
        head's entries. A causal open_clip text tower runs on the batch's used tokens only, in
        the student's own forward (training/text_prefix.py: the same features and gradients;
        `text_length`: the loader's count of used positions, None: read from the ids).
        `text_features`: the text tower's output computed elsewhere, used instead of running it
        (a LiT student, whose frozen text tower is the teacher's: the teacher source computed
        them, training/trainer.py)."""
        outputs = encode_used_tokens(self.student, self.capture, images,
                                     None if text_features is not None else texts, text_length)
        if text_features is not None:
            outputs["text_features"] = text_features
        for head in self.heads.values():
            outputs.update(head(outputs))
        return outputs

    # ---- what the parts declare ----------------------------------------------------------
    def _hooks(self) -> list[TrainingHooks]:
        return [m for m in self.modules() if isinstance(m, TrainingHooks)]

    def regularization(self, step: int) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for hooks in self._hooks():
            terms.update(hooks.regularization(step))
        return terms

    def metrics(self, step: int) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        for hooks in self._hooks():
            values.update(hooks.metrics(step))
        return values

    def param_groups(self, weight_decay: float, named: Sequence[dict] = ()) -> list[dict]:
        """AdamW groups over the trainable parameters (frozen ones stay out): the parts' own
        groups, then decay (matrices) and no decay (gains, biases, norms, logit scale), both on
        the model's schedule. `named`: groups with their own rate, each {"name", "names" (the
        parameter names it takes), "lr" (None: the optimizer's), "weight_decay" (None: the
        default)}, split into "<name>" (decay) and "<name>.no_decay". Empty groups are left out."""
        own = [group for hooks in self._hooks() for group in hooks.extra_param_groups()]
        taken = {id(p) for group in own for p in group["params"]}
        params = dict(self.named_parameters())
        split = {}
        for spec in [*named, {"name": None, "names": list(params)}]:  # the default group last
            halves = split[spec["name"]] = ([], [])
            for name in spec["names"]:
                param = params[name]
                if param.requires_grad and id(param) not in taken:
                    halves[0 if wants_weight_decay(name, param) else 1].append(param)
                    taken.add(id(param))
        decay, no_decay = split[None]
        groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay,
                   "schedule": "model"},
                  {"name": "no_decay", "params": no_decay, "weight_decay": 0.0,
                   "schedule": "model"}]
        for spec in named:
            rate = {} if spec.get("lr") is None else {"lr": spec["lr"]}
            decay_rate = weight_decay if spec.get("weight_decay") is None else spec["weight_decay"]
            decay, no_decay = split[spec["name"]]
            groups += [{"name": spec["name"], "params": decay, "weight_decay": decay_rate,
                        "schedule": "model", **rate},
                       {"name": f"{spec['name']}.no_decay", "params": no_decay,
                        "weight_decay": 0.0, "schedule": "model", **rate}]
        return [group for group in groups if group["params"]] + own  # DeepSpeed: none empty

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the student's towers (open_clip's switch)."""
        self.student.set_grad_checkpointing(enable)

    @staticmethod
    def student_state(task_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's own state dict out of the task's (heads are training-only)."""
        return {k[len(STUDENT_PREFIX):]: v for k, v in task_state.items()
                if k.startswith(STUDENT_PREFIX)}


# Substrings of parameter names that never get weight decay (open_clip's rule, plus biases).
_NO_DECAY_NAME_PARTS = ("bias", "ln_", ".ln", "bn", "norm", "logit_scale")


def wants_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Matrices (ndim >= 2) decay; gains, biases, norms and the logit scale do not."""
    if param.ndim < 2:
        return False
    return not any(part in name for part in _NO_DECAY_NAME_PARTS)
