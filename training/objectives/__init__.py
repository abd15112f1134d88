"""The distillation objective as named terms (one module per term; the contract: base.py).

    loss_fn = DistillationLoss.from_config(cfg.loss)     # or DistillationLoss(affinity_weight=1.0)
    out = loss_fn(student_out, teacher_out, step=step)   # {"loss", "<term>", ..., "weight_<term>"}
    heads, tokens = loss_fn.task_parts(TermModels(student, teacher, s_dim, t_dim))  # before training

`out["loss"]` is the weighted (optionally balanced, balance.py) total with its graph; every
configured term's unweighted value comes back detached under the term's name, so the console,
metrics.jsonl, TensorBoard and W&B show each one without a hand-kept list, and each term's
effective weight as weight_<term> when it is scheduled or balanced.

Config (training/config.py LossConfig): `loss.terms: {name: {weight: W, ...options}}`, W a
number or a schedule (schedules.py); the older keys affinity_weight, clip_weight,
feature_weight (+ feature_kind) are shorthand for the affinity, clip and feature terms;
`fixed_logit_scale` applies to every term that uses a logit scale. `configured_terms(cfg)`
resolves and checks all that (one-line ConfigError naming loss.terms.<name>.<option>) before
anything is built. Every module of this package is imported here, so each term registers itself.

Rows and positives: the student's image rows and text rows (K captions per image: K text rows
per image, image-major) get ids from their position; each rank scores its rows against the
gathered columns (base.py). Identical caption texts of different images are NOT positives of
each other: positives are by image (TinyCLIP-ConvFFN's rule; docs/objectives.md).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from training.config_files import ConfigError
from training.distributed import rank_and_world
from training.objectives.balance import build_balancer
from training.objectives.base import (TERMS, LossTerm, TermInputs, TermModels,
                                      contrastive_targets, register_term, soft_cross_entropy)
from training.objectives.schedules import Schedule, parse_schedule
from training.tokens import is_token_key

for _module in pkgutil.iter_modules(__path__):  # every term module registers its terms
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DistillationLoss", "LossTerm", "TERMS", "TermInputs", "TermModels", "configured_terms",
           "contrastive_targets", "register_term", "row_ids", "soft_cross_entropy"]

SHORTHAND = {"affinity": "affinity_weight", "clip": "clip_weight", "feature": "feature_weight"}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _options_of(cls: type[LossTerm]) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


def configured_terms(cfg) -> dict[str, tuple[Schedule, LossTerm]]:
    """{name: (weight schedule, term)} of a LossConfig, in config order (shorthand terms first),
    without the terms whose weight is 0 at every step. ConfigError (one line, naming
    loss.terms.<name>[.<option>] or the shorthand key) for an unknown term or option, a bad
    weight or option value, or a term set twice."""
    terms = _plain(cfg.terms) or {}
    if not isinstance(terms, Mapping):
        raise ConfigError(f"key loss.terms: must be a mapping {{name: {{weight: W, ...}}}}, "
                          f"got {terms!r}")
    specs: dict[str, dict] = {}
    affinity = cfg.affinity_weight if cfg.affinity_weight is not None else (0.0 if terms else 1.0)
    shorthand = {"affinity": affinity, "clip": cfg.clip_weight, "feature": cfg.feature_weight}
    for name, weight in shorthand.items():
        if weight and name in terms:
            raise ConfigError(f"key loss.terms.{name}: also set as loss.{SHORTHAND[name]}; "
                              f"set one of the two")
        if weight:
            specs[name] = {"weight": weight, **({"kind": cfg.feature_kind}
                                                 if name == "feature" else {})}
    for name, options in terms.items():
        if name not in TERMS:
            raise ConfigError(f"key loss.terms.{name}: unknown term; known: "
                              f"{', '.join(sorted(TERMS))}")
        options = {} if options is None else options
        if not isinstance(options, Mapping):
            raise ConfigError(f"key loss.terms.{name}: must be a mapping {{weight: W, ...}}, "
                              f"got {options!r}")
        known = _options_of(TERMS[name])
        for option in options:
            if option != "weight" and option not in known:
                raise ConfigError(f"key loss.terms.{name}.{option}: unknown option; the {name} "
                                  f"term takes weight{''.join(', ' + k for k in known)}")
        specs[name] = {"weight": 1.0, **options}
    resolved = {}
    for name, options in specs.items():
        options = dict(options)
        key = f"loss.terms.{name}" if name in terms else f"loss.{SHORTHAND[name]}"
        try:
            weight = parse_schedule(options.pop("weight"))
        except ValueError as err:
            raise ConfigError(f"key {key}{'.weight' if name in terms else ''}: {err}") from None
        if weight.always_zero():
            continue
        try:
            resolved[name] = (weight, TERMS[name](**options))
        except ValueError as err:
            raise ConfigError(f"key {key}: {err}") from None
    return resolved


def row_ids(num_images: int, num_texts: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(local image ids, global image ids, local text ids, global text ids): an image's id is
    its global row position (rank-order concatenation), each of its K captions (K text rows,
    image-major) carries it. All ranks pass the same counts."""
    if num_texts % num_images:
        raise ValueError(f"loss: {num_texts} text rows for {num_images} image rows; K captions "
                         f"per image give K text rows per image")
    k = num_texts // num_images
    rank, world = rank_and_world()
    global_ids = torch.arange(num_images * world, device=device)
    local_ids = global_ids[rank * num_images:(rank + 1) * num_images]
    return local_ids, global_ids, local_ids.repeat_interleave(k), global_ids.repeat_interleave(k)


class DistillationLoss(nn.Module):
    """The configured terms, weighted (scheduled, optionally balanced) and summed.

    DistillationLoss(cfg) takes a LossConfig; keyword arguments build one
    (DistillationLoss(affinity_weight=1.0, fixed_logit_scale=50.0), terms={...}, balance=...).
    """

    def __init__(self, config=None, **settings):
        super().__init__()
        if config is None:
            from training.config import LossConfig
            config = LossConfig(**settings)
        config.validate()
        self.cfg = config
        resolved = config.active_terms()
        self.terms = nn.ModuleDict({name: term for name, (_, term) in resolved.items()})
        self.weights = {name: weight for name, (weight, _) in resolved.items()}
        self.balancer = build_balancer(config.balance, list(resolved))
        self.log_weights = config.balance != "none" or not all(
            w.is_constant for w in self.weights.values())

    @classmethod
    def from_config(cls, cfg) -> "DistillationLoss":
        return cls(cfg)

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    def task_parts(self, models: TermModels) -> tuple[dict[str, nn.Module], set[str]]:
        """What the task module needs for these terms, before training: the trainable heads
        (training/task.py, by name; terms asking for the same head name share it; plus the
        balancer's) and the student's token-level outputs to capture (training/tokens.py). The
        teacher source is asked for the token-level outputs the terms read from it (a one-line
        ValueError from a source without a model)."""
        heads: dict[str, nn.Module] = {}
        token_outputs: set[str] = set()
        for name, term in self.terms.items():
            if models.teacher is not None:
                models.teacher.require_outputs([k for k in term.teacher_keys if is_token_key(k)],
                                               f"loss.terms.{name}")
            token_outputs.update(k for k in term.student_keys if is_token_key(k))
            for head_name, head in term.task_heads(models).items():
                heads.setdefault(head_name, head)
        heads.update(self.balancer.task_heads())
        return heads, token_outputs

    def checkpoint_parts(self) -> dict:
        """State of the objective a resume needs besides the task's weights (training/checkpoint.py
        CheckpointPart): the loss-ratio balancer's references."""
        return self.balancer.checkpoint_parts()

    def inputs(self, student: dict, teacher: dict | None, step: int = 0) -> TermInputs:
        device = student["image_features"].device
        ids = row_ids(student["image_features"].shape[0], student["text_features"].shape[0],
                      device)
        return TermInputs(student, teacher, ids[0], ids[1], step=step,
                          fixed_logit_scale=self.cfg.fixed_logit_scale,
                          local_text_ids=ids[2], global_text_ids=ids[3])

    def forward(self, student: dict, teacher: dict | None = None, step: int = 0
                ) -> dict[str, torch.Tensor]:
        """{"loss": the total (with graph)} + each term unweighted and detached (+ its weight,
        when scheduled or balanced) + the logit scales and temperatures applied (`scales`)."""
        if teacher is None and self.needs_teacher:
            names = [n for n, t in self.terms.items() if t.needs_teacher]
            raise ValueError(f"loss: the {', '.join(names)} term(s): needs teacher outputs "
                             f"(the run has no teacher)")
        inputs = self.inputs(student, teacher, step)
        values = {name: term(inputs) for name, term in self.terms.items()}
        weights = {name: schedule(step) for name, schedule in self.weights.items()}
        total, factors = self.balancer.combine(values, weights, student)
        out = {"loss": total, **{name: value.detach() for name, value in values.items()}}
        if self.log_weights:
            out.update({f"weight_{name}": f.detach().float().reshape(())
                        for name, f in factors.items()})
        out.update(self.scales(inputs, teacher))
        return out

    @torch.no_grad()
    def scales(self, inputs: TermInputs, teacher: dict | None) -> dict[str, torch.Tensor]:
        """The logit scales the terms applied (the fixed one, else each model's own) and the
        terms' own (e.g. tempkd_temperature), to log."""
        scales = {"logit_scale": inputs.student_scale().detach().reshape(())}
        for term in self.terms.values():
            scales.update({k: v.detach().reshape(()) for k, v in term.scales(inputs).items()})
        if teacher is None:
            return scales
        members = inputs.teacher_members()
        if "ensemble" not in teacher:
            scales["teacher_logit_scale"] = torch.as_tensor(inputs.teacher_scale(members[0])).float()
            return scales
        for t, member in enumerate(members):
            scales[f"teacher_logit_scale.{t}"] = torch.as_tensor(inputs.teacher_scale(member)).float()
        return scales
