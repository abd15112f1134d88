"""The training config: a typed schema (OmegaConf structured dataclasses), YAML + overrides.

Every run is described by one `TrainConfig`. `load_config(path, overrides)` merges the YAML file
and `section.key=value` overrides onto the schema (training/config_files.py, the one loader), so
an unknown key or a wrong type fails at once; then each section validates its own settings
(`<Section>.validate()`, torchtitan-style: the rules live with the settings they check; the
`data` section is the data package's, training/data/config.py) and `TrainConfig.validate` adds
the rules that tie sections together. All raise `ConfigError` with ONE line naming the file and
the key; the CLI prints that line instead of a traceback. This runs before any process group or
model is built. The resolved config is saved to RUN_DIR/config.yaml and into every checkpoint.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf

from training.config_files import ConfigError, load_structured
from training.data.config import DataConfig
from training.files import WEIGHT_FILE_SUFFIXES, write_text_atomic

PRECISIONS = ("fp32", "bf16", "fp16")
FEATURE_KINDS = ("mse", "cosine")
WANDB_MODES = ("disabled", "offline", "online")
PRUNE_MODES = ("uniform", "per_layer")
TEACHER_SOURCES = ("live", "shards")  # training/teachers.py  # how training/inheritance/prune.py exports a masked student

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "load_config", "save_config",
           "to_dict"]


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"key {key}: {message}")


def _is_safetensors(path: str) -> bool:
    """The file's safetensors header parses (reads the header only)."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt"):
            return True
    except Exception:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        return False


def _cuda_available(cuda_available: Optional[bool]) -> bool:
    if cuda_available is None:
        import torch
        return torch.cuda.is_available()
    return cuda_available


@dataclass
class MaskConfig:
    """Automatic inheritance: L0 gates learned under a sparsity constraint, pruned at export."""
    target_sparsity: float = MISSING  # fraction of attention + MLP weights to remove, in [0, 1)
    start_sparsity: float = 0.0  # the constraint's target rises from here ...
    warmup_steps: int = 0  # ... to target_sparsity over this many steps
    lr: float = 0.05  # constant AdamW rate of the gates and the Lagrange multipliers
    prune_mode: str = "uniform"  # uniform (plain open_clip export) | per_layer (load_pruned)

    def validate(self) -> None:
        _require(0 <= self.target_sparsity < 1, "model.mask.target_sparsity",
                 f"must be in [0, 1), got {self.target_sparsity}")
        _require(0 <= self.start_sparsity <= self.target_sparsity, "model.mask.start_sparsity",
                 f"must be between 0 and model.mask.target_sparsity, got {self.start_sparsity}")
        _require(self.warmup_steps >= 0, "model.mask.warmup_steps", "must be >= 0")
        _require(self.lr > 0, "model.mask.lr", "must be > 0")
        _require(self.prune_mode in PRUNE_MODES, "model.mask.prune_mode",
                 f"must be one of {PRUNE_MODES}, got {self.prune_mode!r}")


FUSION_KINDS = ("film", "cross_attention")
# model.student_init's keyword: inherit in-process from the configured teacher (clip-inherit's
# default rule), instead of a state-dict file.
STUDENT_INIT_TEACHER = "teacher"


@dataclass
class FusionConfig:
    """KDEOV's text-visual fusion head (training/fusion.py), trained by the fused_feature term
    (loss.terms.fused_feature)."""
    kind: str = "film"  # film | cross_attention
    hidden: Optional[int] = None  # film: width of the gamma/beta MLP (None: the feature width)
    heads: int = 1  # cross_attention: attention heads (must divide the feature width)

    def validate(self) -> None:
        _require(self.kind in FUSION_KINDS, "model.fusion.kind",
                 f"must be one of {FUSION_KINDS}, got {self.kind!r}")
        _require(self.hidden is None or self.hidden >= 1, "model.fusion.hidden",
                 f"must be >= 1 or null, got {self.hidden}")
        _require(self.heads >= 1, "model.fusion.heads", f"must be >= 1, got {self.heads}")


@dataclass
class EnsembleTeacher:
    """One more teacher of a stored embedding set (model.ensemble)."""
    model: str = MISSING  # as model.teacher
    pretrained: Optional[str] = None  # as model.teacher_pretrained
    logit_scale: Optional[float] = None  # None: the teacher's own (recorded in the set)


@dataclass
class ModelConfig:
    student: str = MISSING  # open_clip model name or path to a model-config JSON
    # state-dict file (e.g. from clip-inherit), or "teacher": inherited in-process from
    # model.teacher + model.teacher_pretrained by clip-inherit's default rule (TinyCLIP's recipes)
    student_init: Optional[str] = None
    teacher: Optional[str] = None  # open_clip model name or JSON; None = plain CLIP training
    teacher_pretrained: Optional[str] = None  # pretrained tag or local checkpoint file
    teacher_dtype: str = "fp32"  # fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    mask: Optional[MaskConfig] = None  # set: train a masked student, export it pruned
    # Where the teacher's outputs come from: live (run model.teacher every step) or shards
    # (embeddings `clip-data embed` stored beside the shards: no teacher model is built).
    teacher_source: str = "live"
    # The embedding set: folder NAME beside each shard folder (`clip-data embed --name NAME`).
    # Required by shards; with live, the views and captions are the set's stored augmentations.
    teacher_embeddings: Optional[str] = None
    teacher_logit_scale: Optional[float] = None  # shards: None = the teacher's own (in the set)
    ensemble: List[EnsembleTeacher] = field(default_factory=list)  # shards: more teachers
    fusion: Optional[FusionConfig] = None  # set: a FiLM / cross-attention head (KDEOV)

    def validate(self, cuda_available: bool) -> None:
        _require(self.teacher_dtype in PRECISIONS, "model.teacher_dtype",
                 f"must be one of {PRECISIONS}, got {self.teacher_dtype!r}")
        _require(self.teacher_dtype != "fp16" or cuda_available, "model.teacher_dtype",
                 "fp16 needs a GPU; use bf16 or fp32")
        if self.student_init == STUDENT_INIT_TEACHER:
            _require(self.teacher is not None and self.teacher_pretrained is not None,
                     "model.student_init", f"{STUDENT_INIT_TEACHER!r} inherits the teacher's "
                     f"weights: needs model.teacher and model.teacher_pretrained (got "
                     f"{self.teacher!r}, {self.teacher_pretrained!r})")
        else:
            _require(self.student_init is None or os.path.isfile(self.student_init),
                     "model.student_init", f"file not found: {self.student_init}")
        pretrained = self.teacher_pretrained
        _require(pretrained is None or self.teacher is None  # unused without a teacher
                 or not pretrained.endswith(WEIGHT_FILE_SUFFIXES)
                 or os.path.isfile(pretrained), "model.teacher_pretrained",
                 f"file not found: {pretrained}")
        for key, path in (("model.student_init", self.student_init),
                          ("model.teacher_pretrained", pretrained if self.teacher else None)):
            if path is not None and path.endswith(".safetensors") and os.path.isfile(path):
                _require(_is_safetensors(path), key, f"{path} is not a safetensors file (its "
                         f"header does not parse)")
        if self.mask is not None:
            self.mask.validate()
        if self.fusion is not None:
            self.fusion.validate()
        self._validate_teacher_source()
        if self.student.startswith("lit:"):  # training/specs.py LitSpec
            _require(self.teacher is not None, "model.teacher",
                     f"required with model.student={self.student} (its frozen text tower is "
                     f"the teacher's)")
            _require(self.teacher_source == "live" or self.teacher_pretrained is not None,
                     "model.teacher_pretrained", f"required with model.student={self.student} "
                     f"and stored embeddings (the frozen text tower's weights)")
            _require(self.mask is None, "model.mask", "not supported with a lit: student")
            _require(not self.ensemble, "model.ensemble",
                     "not supported with a lit: student (its text features are one teacher's)")

    def _validate_teacher_source(self) -> None:
        _require(self.teacher_source in TEACHER_SOURCES, "model.teacher_source",
                 f"must be one of {TEACHER_SOURCES}, got {self.teacher_source!r}")
        name = self.teacher_embeddings
        _require(name is None or (name not in ("", ".", "..") and "/" not in name
                                  and "\\" not in name), "model.teacher_embeddings",
                 f"must be a folder name (no path), got {name!r}")
        stored = self.teacher_source == "shards"
        _require(not stored or name is not None, "model.teacher_embeddings",
                 "required with model.teacher_source=shards (the set clip-data embed --name wrote)")
        _require(not stored or self.teacher is not None, "model.teacher",
                 "required with model.teacher_source=shards: it names the stored set's teacher")
        _require(stored or not self.ensemble, "model.ensemble",
                 "needs model.teacher_source=shards (an ensemble is read from stored embeddings)")
        _require(stored or self.teacher_logit_scale is None, "model.teacher_logit_scale",
                 "needs model.teacher_source=shards (a live teacher uses its own)")
        scales = [self.teacher_logit_scale] + [member.logit_scale for member in self.ensemble]
        _require(all(scale is None or scale > 0 for scale in scales), "model.teacher_logit_scale",
                 f"logit scales must be > 0 or null, got {scales}")
        for i, member in enumerate(self.ensemble):
            _require(member.pretrained is None or not member.pretrained.endswith(
                WEIGHT_FILE_SUFFIXES) or os.path.isfile(member.pretrained),
                f"model.ensemble.{i}.pretrained", f"file not found: {member.pretrained}")


@dataclass
class LossConfig:
    """The objective: named terms (training/objectives/, docs/objectives.md), weighted, summed.

    terms: {name: {weight: W, ...options}}; W a number or a schedule over optimizer steps
    ({kind: linear, ...} / {kind: steps, ...}, training/objectives/schedules.py). The *_weight
    keys are shorthand for the affinity, clip and feature terms (feature_kind: the feature
    term's kind); affinity_weight left unset means 1.0 unless loss.terms names the terms.
    """
    affinity_weight: Optional[float] = None  # TinyCLIP affinity mimicking (needs a teacher)
    clip_weight: float = 0.0  # ground-truth contrastive loss
    feature_weight: float = 0.0  # feature distillation (needs a teacher)
    feature_kind: str = "mse"  # mse | cosine
    fixed_logit_scale: Optional[float] = None  # e.g. 50: force both scales (TinyCLIP recipes)
    terms: Dict[str, Any] = field(default_factory=dict)  # {name: {weight: W, ...options}}
    balance: str = "none"  # none | uncertainty | loss_ratio (training/objectives/balance.py)

    WEIGHTS = ("affinity_weight", "clip_weight", "feature_weight")

    def active_terms(self) -> dict:
        """{name: (weight schedule, term)}: the configured terms as validate() resolved and
        checked them (once: the term modules hold no state, so the loss uses these very ones)."""
        if getattr(self, "_terms", None) is None:
            self.validate()
        return self._terms

    def validate(self) -> None:
        from training.objectives import configured_terms
        from training.objectives.balance import BALANCE_MODES
        for name in self.WEIGHTS:
            value = getattr(self, name)
            _require(value is None or value >= 0, f"loss.{name}", "must be >= 0")
        _require(self.feature_kind in FEATURE_KINDS, "loss.feature_kind",
                 f"must be one of {FEATURE_KINDS}, got {self.feature_kind!r}")
        _require(self.fixed_logit_scale is None or self.fixed_logit_scale > 0,
                 "loss.fixed_logit_scale", "must be > 0 or null")
        _require(self.balance in BALANCE_MODES, "loss.balance",
                 f"must be one of {BALANCE_MODES}, got {self.balance!r}")
        self._terms = configured_terms(self)  # ConfigError naming loss.terms.<name>.<option>
        _require(bool(self._terms), "loss",
                 "all weights are 0 (affinity_weight, clip_weight, feature_weight, "
                 "loss.terms): nothing to train")


@dataclass
class ParamGroupConfig:
    """Parameters with their own learning rate (optim.param_groups), e.g. the heads at 1e-3."""
    name: str = MISSING  # logged as lr/<name>; the optimizer groups <name> and <name>.no_decay
    # fnmatch globs over the task's parameter names (student.visual.*, heads.*, *proj*): a
    # parameter joins the first group with a matching glob; one matched by none keeps optim.lr
    match: List[str] = field(default_factory=list)
    lr: Optional[float] = None  # None: optim.lr (the warm-up + cosine scales this base rate)
    weight_decay: Optional[float] = None  # None: optim.weight_decay (matrices only either way)

    def validate(self, key: str, names: set) -> None:
        _require(re.fullmatch(r"[A-Za-z][\w-]*", self.name or "") is not None
                 and self.name not in ("decay", "no_decay"), f"{key}.name",
                 f"must be a word (letters, digits, _ or -) other than decay / no_decay, "
                 f"got {self.name!r}")
        _require(self.name not in names, f"{key}.name", f"{self.name!r} is used twice")
        _require(len(self.match) > 0 and all(self.match), f"{key}.match",
                 "must list at least one non-empty glob")
        _require(self.lr is None or self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay is None or self.weight_decay >= 0, f"{key}.weight_decay",
                 f"must be >= 0, got {self.weight_decay}")


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
    param_groups: List[ParamGroupConfig] = field(default_factory=list)  # own lr per group

    def validate(self) -> None:
        _require((self.total_steps is None) != (self.epochs is None), "optim.total_steps",
                 "set exactly one of optim.total_steps and optim.epochs")
        _require(self.total_steps is None or self.total_steps > 0, "optim.total_steps",
                 "must be > 0")
        _require(self.epochs is None or self.epochs > 0, "optim.epochs", "must be > 0")
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay",
                 f"must be >= 0, got {self.weight_decay}")
        _require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be between 0 and optim.lr")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                 "must be two numbers in [0, 1)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(self.total_steps is None or self.warmup_steps < self.total_steps,
                 "optim.warmup_steps", "must be smaller than optim.total_steps")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
        _require(self.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
        names: set = set()
        for i, group in enumerate(self.param_groups):
            group.validate(f"optim.param_groups.{i}", names)
            names.add(group.name)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0 | 1 | 2 | 3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 only on GPU)
    backend: Optional[str] = None  # None: nccl on GPU, gloo on CPU
    dist_timeout_s: int = 120  # a lost rank fails the run after this long

    def validate(self, cuda_available: bool) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage",
                 f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.precision in PRECISIONS, "deepspeed.precision",
                 f"must be one of {PRECISIONS}, got {self.precision!r}")
        _require(self.precision != "fp16" or cuda_available, "deepspeed.precision",
                 "fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
        _require(self.backend in (None, "gloo", "nccl"), "deepspeed.backend",
                 f"must be gloo, nccl or null, got {self.backend!r}")
        _require(self.backend != "nccl" or cuda_available, "deepspeed.backend",
                 "nccl needs a GPU")
        _require(self.dist_timeout_s > 0, "deepspeed.dist_timeout_s", "must be > 0")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end (and on preemption)
    keep_last: int = 2
    resume: Optional[str] = None  # None | "latest" | path to a checkpoint tag directory
    export_at_end: bool = True  # write RUN_DIR/export/ (open_clip format) when done

    def validate(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _require(self.resume in (None, "latest") or os.path.isdir(self.resume),
                 "checkpoint.resume", f"must be null, 'latest' or an existing checkpoint "
                 f"directory, got {self.resume!r}")


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "clip-distill"

    def validate(self) -> None:
        _require(self.every_steps >= 1, "log.every_steps", "must be >= 1")
        _require(self.wandb in WANDB_MODES, "log.wandb",
                 f"must be one of {WANDB_MODES}, got {self.wandb!r}")


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: no periodic evaluation
    val: Optional[str] = None  # image-text shards: retrieval R@1/5/10
    zeroshot: Optional[str] = None  # labelled shards with classnames.txt: zero-shot top-1
    batch_size: int = 64
    max_samples: Optional[int] = None  # cap per set (fast periodic evaluation)
    at_end: bool = True

    def validate(self) -> None:
        _require(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _require(self.every_steps == 0 or self.val or self.zeroshot, "eval.every_steps",
                 "> 0 but neither eval.val nor eval.zeroshot is set")
        _require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.max_samples is None or self.max_samples >= 1, "eval.max_samples",
                 f"must be >= 1 or null, got {self.max_samples}")


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

    def validate(self, cuda_available: Optional[bool] = None) -> None:
        """Each section's own rules, then the rules that tie sections together."""
        cuda = _cuda_available(cuda_available)
        self.data.validate()
        self.model.validate(cuda)
        self.deepspeed.validate(cuda)
        for section in (self.loss, self.optim, self.checkpoint, self.log, self.eval):
            section.validate()
        terms = self.loss.active_terms()
        teacher_terms = [name for name, (_, term) in terms.items() if term.needs_teacher]
        _require(not teacher_terms or self.model.teacher is not None, "model.teacher",
                 f"missing, but the loss term(s) {', '.join(teacher_terms)} need a teacher "
                 f"(set loss.affinity_weight=0 and use the clip term for plain CLIP training)")
        single = [name for name, (_, term) in terms.items() if term.single_teacher]
        _require(not self.model.ensemble or not single, "loss.terms",
                 f"the {', '.join(single)} term(s) need one teacher, not model.ensemble "
                 f"(the affinity term averages an ensemble)")
        fusion_term = "fused_feature" in terms
        _require((self.model.fusion is None) != fusion_term, "loss.terms.fused_feature",
                 "must be set (weight > 0) exactly when model.fusion is set (the fusion head's "
                 "only gradient comes from the fused_feature term)")
        if self.model.mask is not None:
            # The masked forward reads the blocks' weights itself: ZeRO-3's per-module
            # gathering never runs, and its activation checkpointing switch does not exist.
            _require(self.deepspeed.zero_stage < 3, "deepspeed.zero_stage",
                     "model.mask needs ZeRO stage 0, 1 or 2 (the masked forward bypasses "
                     "ZeRO-3 hooks)")
            _require(not self.model.grad_checkpointing, "model.grad_checkpointing",
                     "not supported with model.mask")
            # Each forward samples new gates: cached and live micro-batch passes would disagree.
            _require(self.optim.grad_accum_steps == 1, "optim.grad_accum_steps",
                     "must be 1 with model.mask (each forward samples its own gates)")


def load_config(path: Optional[str] = None, overrides: List[str] = (), *,
                cuda_available: Optional[bool] = None) -> TrainConfig:
    """YAML file + `section.key=value` overrides -> a validated TrainConfig."""
    cfg = load_structured(TrainConfig, path, overrides)
    _run_length_from_overrides(cfg, overrides)
    try:
        cfg.validate(cuda_available)
    except ConfigError as err:
        raise ConfigError(f"{_source_of(str(err), path, overrides)}: {err}") from None
    return cfg


def _run_length_from_overrides(cfg: TrainConfig, overrides: List[str]) -> None:
    """optim.total_steps and optim.epochs are two ways to say how long a run is: an override that
    sets one replaces the recipe's other (`optim.total_steps=500` on a recipe with `epochs: 1`
    means 500 steps). Both set in the YAML file itself stay an error (validate)."""
    for item in reversed(list(overrides)):
        key = item.split("=", 1)[0].strip()
        if key in ("optim.total_steps", "optim.epochs"):
            name = key.split(".")[1]
            if getattr(cfg.optim, name) is not None:
                setattr(cfg.optim, "epochs" if name == "total_steps" else "total_steps", None)
            return


def _source_of(message: str, path: Optional[str], overrides: List[str]) -> str:
    """Where the value a validation error names came from: the last override that set its key
    (or a section holding it), else the YAML file."""
    match = re.match(r"key ([\w.]+)", message)
    key = match.group(1) if match else None
    for item in reversed(list(overrides)):
        name = item.split("=", 1)[0].strip()
        if key is not None and (key == name or key.startswith(name + ".")):
            return f"override {item!r}"
    return path or "<config>"


def to_dict(cfg: TrainConfig) -> dict:
    """Plain dict (for checkpoints, metrics, W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
