"""`clip-stages --config configs/stages/x.yaml [key=value ...]`: multi-stage compression.

Each stage inherits its student's weights (clip-inherit, in process), trains it (a subprocess
per stage, so each gets a fresh DeepSpeed engine and process group) and exports it; the next
stage inherits from that export. The distillation teacher is the same in every stage.

    RUN_ROOT/<stage>/inherit/{student.safetensors, inheritance.json}
    RUN_ROOT/<stage>/...           the training run dir (checkpoints/, export/, done.json)

Automatic inheritance stages set `model.mask.*` in their overrides: the run learns masks and
exports the pruned student. A stage whose `student` is `previous` trains the previous stage's
export itself, weights included (`local-dir:RUN_ROOT/<previous>/export`, no inheritance step):
that is how a pruned student is masked further or distilled (configs/stages/tiny-auto.yaml).

Rerunning the same command is always safe: a stage whose run dir has done.json and its export
is skipped; an unfinished stage re-inherits only if its inputs changed (record.py) and resumes
its training from `checkpoints/latest` (checkpoint.resume=latest). When training stops without
done.json (preemption: the trainer exits 0 after a checkpoint) the driver stops as well and
exits 0; the job is requeued and the rerun continues where it stopped. SIGTERM and SIGUSR1
received by the driver are passed to the training process.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING, OmegaConf

from ..config_files import ConfigError, load_structured, load_yaml
from .cli import run_inherit
from .inherit import WIDTH_CHOICES, InheritRequest
from .manual import DEPTH_RULES

log = logging.getLogger("clip-stages")
INHERIT_FROM = ("teacher", "previous", "none")
PREVIOUS = "previous"  # Stage.student: the previous stage's export, weights included


@dataclass
class InheritStep:
    source: str = "previous"     # teacher | previous (the previous stage's export; the teacher
                                 # for the first stage) | none (train from scratch)
    depth: str = "uniform"       # manual.DEPTH_RULES
    width: str = "front"         # front | weight-norm | activation
    data: Optional[str] = None   # shards for width=activation (default: the training data)
    batches: int = 4
    batch_size: int = 32


@dataclass
class Stage:
    name: str = MISSING
    student: str = MISSING                               # open_clip name or JSON config, or
                                                         # `previous` (the previous stage's export)
    inherit: InheritStep = field(default_factory=InheritStep)
    overrides: List[str] = field(default_factory=list)   # training key=value for this stage


@dataclass
class StagesConfig:
    run_root: str = MISSING
    teacher: str = MISSING                   # the distillation teacher, fixed for all stages
    teacher_pretrained: Optional[str] = None
    train_config: str = MISSING              # base training recipe (YAML)
    data: Optional[str] = None               # data.train for every stage (if not in the recipe)
    launcher: List[str] = field(default_factory=lambda: [sys.executable, "-m", "training"])
    train_overrides: List[str] = field(default_factory=list)
    stages: List[Stage] = field(default_factory=list)


class StageFailed(RuntimeError):
    """A stage's training process exited non-zero."""


def load_stages(path: str, overrides: list[str] = ()) -> StagesConfig:
    """YAML + key=value overrides (they reach into lists: stages.1.student=...) -> a checked
    StagesConfig; a ConfigError (a ValueError) in one line otherwise."""
    cfg = load_structured(StagesConfig, path, overrides)
    _validate(cfg, path)
    return cfg


def _validate(cfg: StagesConfig, path: str) -> None:
    if not cfg.stages:
        raise ConfigError(f"{path}: key stages: no stages")
    if not os.path.isfile(cfg.train_config):
        raise ConfigError(f"{path}: key train_config: {cfg.train_config} not found")
    if cfg.data is None and OmegaConf.is_missing(load_yaml(cfg.train_config).get("data", {}), "train"):
        raise ConfigError(f"{path}: key data: required value is missing ({cfg.train_config} "
                          f"has no data.train)")
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: key stages: duplicate stage names {names}")
    for i, stage in enumerate(cfg.stages):
        key = f"stages[{i}].inherit"
        if stage.inherit.source not in INHERIT_FROM:
            raise ConfigError(f"{path}: key {key}.source: {stage.inherit.source!r} not in {INHERIT_FROM}")
        if stage.inherit.depth not in DEPTH_RULES:
            raise ConfigError(f"{path}: key {key}.depth: {stage.inherit.depth!r} not in {DEPTH_RULES}")
        if stage.inherit.width not in WIDTH_CHOICES:
            raise ConfigError(f"{path}: key {key}.width: {stage.inherit.width!r} not in {WIDTH_CHOICES}")
        if stage.student == PREVIOUS and i == 0:
            raise ConfigError(f"{path}: key stages[0].student: the first stage has no previous "
                             f"stage to start from")
        if not all("=" in o for o in stage.overrides + cfg.train_overrides):
            raise ConfigError(f"{path}: key stages[{i}].overrides: expected key=value items")


def stage_dir(cfg: StagesConfig, stage: Stage) -> Path:
    return Path(cfg.run_root) / stage.name


def is_done(run_dir: Path) -> bool:
    """A stage is complete when training wrote done.json and the export exists (open_clip's
    format, or a per-layer pruned model's pruned_config.json)."""
    export = run_dir / "export"
    return (run_dir / "done.json").is_file() and any(
        (export / name).is_file() for name in ("open_clip_config.json", "pruned_config.json"))


def student_model(cfg: StagesConfig, index: int) -> str:
    """The stage's model.student: its own name, or the previous stage's export folder."""
    stage = cfg.stages[index]
    if stage.student != PREVIOUS:
        return stage.student
    export = stage_dir(cfg, cfg.stages[index - 1]) / "export"
    if (export / "pruned_config.json").is_file():
        raise ValueError(f"stage {stage.name}: {export} is a per-layer pruned model, which open_clip "
                         f"cannot build; use model.mask.prune_mode=uniform in the stage before")
    return f"local-dir:{export}"


def _inherit(cfg: StagesConfig, index: int) -> Optional[str]:
    """Run the stage's inheritance (a no-op when up to date); the state-dict path or None."""
    stage, step = cfg.stages[index], cfg.stages[index].inherit
    if step.source == "none" or stage.student == PREVIOUS:
        return None
    if step.source == "previous" and index > 0:
        source, pretrained = f"local-dir:{stage_dir(cfg, cfg.stages[index - 1]) / 'export'}", None
    else:
        source, pretrained = cfg.teacher, cfg.teacher_pretrained
    request = InheritRequest(teacher=source, teacher_pretrained=pretrained, student=stage.student,
                             out=str(stage_dir(cfg, stage) / "inherit"), depth=step.depth,
                             width=step.width, data=step.data or cfg.data, batches=step.batches,
                             batch_size=step.batch_size)
    return str(run_inherit(request))


def training_command(cfg: StagesConfig, index: int, student_init: Optional[str]) -> list[str]:
    stage = cfg.stages[index]
    overrides = [f"run_dir={stage_dir(cfg, stage)}", f"model.student={student_model(cfg, index)}",
                 f"model.teacher={cfg.teacher}", "checkpoint.resume=latest",
                 "checkpoint.export_at_end=true"]
    if cfg.teacher_pretrained is not None:
        overrides.append(f"model.teacher_pretrained={cfg.teacher_pretrained}")
    # Always set: the recipe's own init (e.g. `teacher`) would replace the stage's choice, even
    # the previous stage's weights a `student: previous` stage is built with.
    overrides.append(f"model.student_init={student_init if student_init is not None else 'null'}")
    if cfg.data is not None:
        overrides.append(f"data.train={cfg.data}")
    return [*cfg.launcher, "--config", cfg.train_config, *overrides, *cfg.train_overrides,
            *stage.overrides]


def _run_forwarding_signals(command: list[str]) -> int:
    """Run the training process; a SIGTERM/SIGUSR1 to the driver is passed on to it."""
    child = subprocess.Popen(command)
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_stages(cfg: StagesConfig) -> bool:
    """Run every stage not yet done, in order. True when all are done."""
    for index, stage in enumerate(cfg.stages):
        run_dir = stage_dir(cfg, stage)
        if is_done(run_dir):
            log.info(f"stage {stage.name}: done, skipped")
            continue
        log.info(f"stage {stage.name}: inherit")
        student_init = _inherit(cfg, index)
        command = training_command(cfg, index, student_init)
        log.info(f"stage {stage.name}: train: {' '.join(command)}")
        status = _run_forwarding_signals(command)
        if status != 0:
            raise StageFailed(f"stage {stage.name}: training exited with status {status}")
        if not is_done(run_dir):
            log.info(f"stage {stage.name}: stopped before the end (preempted); rerun to resume")
            return False
        log.info(f"stage {stage.name}: done, export in {run_dir / 'export'}")
    return True


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name in ("clip-stages", "clip-inherit"):
        logging.getLogger(name).setLevel(logging.INFO)
    parser = argparse.ArgumentParser(prog="clip-stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="stage recipe, e.g. configs/stages/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_stages(args.config, args.overrides)
        run_stages(cfg)
    except ValueError as err:
        print(f"clip-stages: error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:  # any other error is a bug: keep its traceback
        print(f"clip-stages: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
