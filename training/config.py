"""The training config: a typed schema (OmegaConf structured dataclasses), YAML + overrides.

Every run is described by one `TrainConfig`. `load_config(path, overrides)` merges the YAML file
and `section.key=value` overrides onto the schema, so an unknown key or a wrong type fails at
once, then `validate` rejects impossible combinations. Both raise `ConfigError` with ONE line
naming the file and the key; the CLI prints that line instead of a traceback. The resolved config
is saved to RUN_DIR/config.yaml and into every checkpoint (`to_dict`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRECISIONS = ("fp32", "bf16", "fp16")
FEATURE_KINDS = ("mse", "cosine")
WANDB_MODES = ("disabled", "offline", "online")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PRUNE_MODES = ("uniform", "per_layer")  # training.inheritance.prune.MODES


class ConfigError(ValueError):
    """A bad config value: the message is one line that names the key."""


@dataclass
class DataConfig:
    train: str = MISSING  # shard spec: brace-expanded paths / pipe: / URLs; sources joined by '::'
    train_weights: Optional[List[float]] = None  # sampling weight per '::' source (resampled)
    resampled: bool = False  # True: infinite sampling, an "epoch" is samples_per_epoch samples
    samples_per_epoch: Optional[int] = None  # total over all ranks; required when resampled
    batch_size: int = 32  # per rank, per micro-batch
    workers: int = 1  # DataLoader workers per rank
    shuffle_buffer: int = 1000
    max_corrupt_fraction: float = 0.01  # stop with an error above this fraction of bad samples
    corrupt_min_samples: int = 1000  # ... once at least this many samples were read


@dataclass
class MaskConfig:
    """Automatic inheritance: L0 gates learned under a sparsity constraint, pruned at export."""
    target_sparsity: float = MISSING  # fraction of attention + MLP weights to remove, in [0, 1)
    start_sparsity: float = 0.0  # the constraint's target rises from here ...
    warmup_steps: int = 0  # ... to target_sparsity over this many steps
    lr: float = 0.05  # constant AdamW rate of the gates and the Lagrange multipliers
    prune_mode: str = "uniform"  # uniform (plain open_clip export) | per_layer (load_pruned)


@dataclass
class ModelConfig:
    student: str = MISSING  # open_clip model name or path to a model-config JSON
    student_init: Optional[str] = None  # state-dict file (e.g. from clip-inherit)
    teacher: Optional[str] = None  # open_clip model name or JSON; None = plain CLIP training
    teacher_pretrained: Optional[str] = None  # pretrained tag or local checkpoint file
    teacher_dtype: str = "fp32"  # fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    mask: Optional[MaskConfig] = None  # set: train a masked student, export it pruned


@dataclass
class LossConfig:
    affinity_weight: float = 1.0  # TinyCLIP affinity mimicking (needs a teacher)
    clip_weight: float = 0.0  # ground-truth contrastive loss
    feature_weight: float = 0.0  # feature distillation (needs a teacher)
    feature_kind: str = "mse"  # mse | cosine
    fixed_logit_scale: Optional[float] = None  # e.g. 50: force both scales (TinyCLIP recipes)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 0
    total_steps: Optional[int] = None  # optimizer steps; exactly one of total_steps / epochs
    epochs: Optional[int] = None
    min_lr: float = 0.0  # the cosine ends here
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    grad_accum_steps: int = 1  # micro-batches per optimizer step (feature-cached, exact)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0 | 1 | 2 | 3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 only on GPU)
    backend: Optional[str] = None  # None: nccl on GPU, gloo on CPU
    dist_timeout_s: int = 120  # a lost rank fails the run after this long


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end (and on preemption)
    keep_last: int = 2
    resume: Optional[str] = None  # None | "latest" | path to a checkpoint tag directory
    export_at_end: bool = True  # write RUN_DIR/export/ (open_clip format) when done


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "clip-distill"


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: no periodic evaluation
    val: Optional[str] = None  # image-text shards: retrieval R@1/5/10
    zeroshot: Optional[str] = None  # labelled shards with classnames.txt: zero-shot top-1
    batch_size: int = 64
    max_samples: Optional[int] = None  # cap per set (fast periodic evaluation)
    at_end: bool = True


@dataclass
class TrainConfig:
    run_dir: str = MISSING
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: Optional[str] = None, overrides: List[str] = (), *,
                cuda_available: Optional[bool] = None) -> TrainConfig:
    """YAML file + `section.key=value` overrides -> a validated TrainConfig."""
    source = path or "<overrides>"
    try:
        merged = OmegaConf.structured(TrainConfig)
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: config file not found")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"line {mark.line + 1}: " if mark else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(f"{path}: {where}not valid YAML ({problem})") from None
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected section.key=value")
            source = f"override {item!r}"
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{path or '<config>'}: key {missing[0]}: required value is missing")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ConfigError(f"{source}: key {key}: {msg}") from None
    try:
        validate(cfg, cuda_available=cuda_available)
    except ConfigError as err:
        raise ConfigError(f"{path or '<config>'}: {err}") from None
    return cfg


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"key {key}: {message}")


def validate(cfg: TrainConfig, *, cuda_available: Optional[bool] = None) -> None:
    """Reject impossible combinations before any expensive work (one line naming the key)."""
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    ds, opt, loss, model, data = cfg.deepspeed, cfg.optim, cfg.loss, cfg.model, cfg.data
    _require(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage",
             f"must be 0, 1, 2 or 3, got {ds.zero_stage}")
    _require(ds.precision in PRECISIONS, "deepspeed.precision",
             f"must be one of {PRECISIONS}, got {ds.precision!r}")
    _require(ds.precision != "fp16" or cuda_available, "deepspeed.precision",
             "fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    _require(ds.backend in (None, "gloo", "nccl"), "deepspeed.backend",
             f"must be gloo, nccl or null, got {ds.backend!r}")
    _require(ds.backend != "nccl" or cuda_available, "deepspeed.backend", "nccl needs a GPU")
    _require(model.teacher_dtype in PRECISIONS, "model.teacher_dtype",
             f"must be one of {PRECISIONS}, got {model.teacher_dtype!r}")
    _require(model.teacher_dtype != "fp16" or cuda_available, "model.teacher_dtype",
             "fp16 needs a GPU; use bf16 or fp32")
    for name in ("affinity_weight", "clip_weight", "feature_weight"):
        _require(getattr(loss, name) >= 0, f"loss.{name}", "must be >= 0")
    _require(loss.affinity_weight + loss.clip_weight + loss.feature_weight > 0, "loss",
             "all loss weights are 0: nothing to train")
    needs_teacher = loss.affinity_weight > 0 or loss.feature_weight > 0
    _require(not needs_teacher or model.teacher is not None, "model.teacher",
             "missing, but loss.affinity_weight or loss.feature_weight > 0 needs a teacher "
             "(set those to 0 for plain CLIP training)")
    _require(loss.feature_kind in FEATURE_KINDS, "loss.feature_kind",
             f"must be one of {FEATURE_KINDS}, got {loss.feature_kind!r}")
    _require(loss.fixed_logit_scale is None or loss.fixed_logit_scale > 0,
             "loss.fixed_logit_scale", "must be > 0 or null")
    _require((opt.total_steps is None) != (opt.epochs is None), "optim.total_steps",
             "set exactly one of optim.total_steps and optim.epochs")
    _require(opt.total_steps is None or opt.total_steps > 0, "optim.total_steps", "must be > 0")
    _require(opt.epochs is None or opt.epochs > 0, "optim.epochs", "must be > 0")
    _require(opt.lr > 0, "optim.lr", "must be > 0")
    _require(0 <= opt.min_lr <= opt.lr, "optim.min_lr", "must be between 0 and optim.lr")
    _require(len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas), "optim.betas",
             "must be two numbers in [0, 1)")
    _require(opt.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(opt.total_steps is None or opt.warmup_steps < opt.total_steps, "optim.warmup_steps",
             "must be smaller than optim.total_steps")
    _require(opt.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
    _require(opt.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
    _require(data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _require(data.workers >= 0, "data.workers", "must be >= 0")
    _require(0 <= data.max_corrupt_fraction <= 1, "data.max_corrupt_fraction",
             "must be in [0, 1]")
    _require(not data.resampled or (data.samples_per_epoch or 0) > 0, "data.samples_per_epoch",
             "required (> 0) when data.resampled is true")
    sources = len(data.train.split("::"))
    _require(data.train_weights is None or data.resampled, "data.train_weights",
             "sampling weights need data.resampled=true (exact epochs read every sample once)")
    _require(data.train_weights is None or len(data.train_weights) == sources,
             "data.train_weights", f"needs one weight per '::' source ({sources})")
    _require(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _require(cfg.log.every_steps >= 1, "log.every_steps", "must be >= 1")
    _require(cfg.log.wandb in WANDB_MODES, "log.wandb",
             f"must be one of {WANDB_MODES}, got {cfg.log.wandb!r}")
    _require(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0")
    _require(cfg.eval.every_steps == 0 or cfg.eval.val or cfg.eval.zeroshot, "eval.every_steps",
             "> 0 but neither eval.val nor eval.zeroshot is set")
    _require(model.student_init is None or os.path.isfile(model.student_init),
             "model.student_init", f"file not found: {model.student_init}")
    pretrained = model.teacher_pretrained
    _require(pretrained is None or model.teacher is None  # unused without a teacher
             or not pretrained.endswith(WEIGHT_FILE_SUFFIXES)
             or os.path.isfile(pretrained), "model.teacher_pretrained", f"file not found: {pretrained}")
    if model.mask is not None:
        validate_mask(cfg)
    resume = cfg.checkpoint.resume
    _require(resume in (None, "latest") or os.path.isdir(resume), "checkpoint.resume",
             f"must be null, 'latest' or an existing checkpoint directory, got {resume!r}")


def validate_mask(cfg: TrainConfig) -> None:
    """model.mask: the constraint's numbers, and what the masked forward cannot do."""
    mask = cfg.model.mask
    _require(0 <= mask.target_sparsity < 1, "model.mask.target_sparsity",
             f"must be in [0, 1), got {mask.target_sparsity}")
    _require(0 <= mask.start_sparsity <= mask.target_sparsity, "model.mask.start_sparsity",
             f"must be between 0 and model.mask.target_sparsity, got {mask.start_sparsity}")
    _require(mask.warmup_steps >= 0, "model.mask.warmup_steps", "must be >= 0")
    _require(mask.lr > 0, "model.mask.lr", "must be > 0")
    _require(mask.prune_mode in PRUNE_MODES, "model.mask.prune_mode",
             f"must be one of {PRUNE_MODES}, got {mask.prune_mode!r}")
    # The masked forward reads the blocks' weights itself: ZeRO-3's per-module gathering never
    # runs, and its activation checkpointing switch does not exist.
    _require(cfg.deepspeed.zero_stage < 3, "deepspeed.zero_stage",
             "model.mask needs ZeRO stage 0, 1 or 2 (the masked forward bypasses ZeRO-3 hooks)")
    _require(not cfg.model.grad_checkpointing, "model.grad_checkpointing",
             "not supported with model.mask")
    # Each forward samples new gates: cached and live micro-batch passes would disagree.
    _require(cfg.optim.grad_accum_steps == 1, "optim.grad_accum_steps",
             "must be 1 with model.mask (each forward samples its own gates)")


def to_dict(cfg: TrainConfig) -> dict:
    """Plain dict (for checkpoints, metrics, W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)
