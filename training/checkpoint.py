"""Checkpoints made of named parts: save / rotate / `latest` / resume, and the resume check.

Layout under RUN_DIR/checkpoints/: one DeepSpeed tag directory per save (`step-00000100/`) holding
DeepSpeed's files (the task module, optimizer, scheduler, our client state) plus our own
`run.json`, and our own `latest` file naming the newest COMPLETE tag. DeepSpeed is told
`save_latest=False`; `latest` is written only after every rank has finished writing (barrier),
atomically, so a run killed mid-save leaves `latest` on the previous good checkpoint and a partial
tag directory that resume ignores (and the next save overwrites or rotation deletes).

The client state is a dict of named parts, each saving and loading itself (CheckpointPart):
`train_state` (steps, samples), `data_position` (epoch, batches consumed), `rng` (every rank's
generators). The task's own non-parameter state rides in the module's state dict
(training/task.py). `run.json` (JSON, read without unpickling anything) records what the run
was: the resolved config, world size, ZeRO stage, step. Before anything is built, `check_resume`
compares it with the new run and refuses, in one line naming the setting, what cannot continue
exactly; reading checkpoint files offline is training/checkpoint_files.py.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from training.checkpoint_files import (FORMAT_VERSION, LATEST, RUN_RECORD, read_latest,
                                       read_run_record)
from training.config_files import ConfigError
from training.distributed import barrier, rank_and_world
from training.files import write_json_atomic, write_text_atomic

_TAG_RE = re.compile(r"^step-(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(tag: str) -> Optional[int]:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- parts

class CheckpointPart(Protocol):
    """Something a checkpoint saves and a resume restores, under its own name."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """How far training is."""
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # over all ranks

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])


@dataclass
class DataPosition:
    """Where in the data stream training is: per-rank micro-batches of `epoch` consumed (valid
    for the world size, batch size and worker count that wrote it: check_resume holds them)."""
    epoch: int = 0
    batches_in_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RngStates:
    """Every rank's random generators (DeepSpeed stores client state from rank 0 only, so each
    rank's states are gathered into it; collective). A resume restores this rank's."""

    def state_dict(self) -> dict:
        if not (dist.is_available() and dist.is_initialized()):
            return {"ranks": [rng_state()]}
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
        return {"ranks": states}

    def load_state_dict(self, state: dict) -> None:
        rank, world = rank_and_world()
        if len(state["ranks"]) == world:  # check_resume holds the world size
            set_rng_state(state["ranks"][rank])


# --------------------------------------------------------------------------- the resume check

# Settings a checkpoint can only continue under unchanged: (dotted key, why).
RESUME_INVARIANTS = (
    ("deepspeed.zero_stage", "the optimizer state is partitioned for that stage"),
    ("deepspeed.precision", "the saved weights and optimizer state are in that precision"),
    ("data.batch_size", "the saved data position counts batches of that size"),
    ("optim.grad_accum_steps", "the saved data position counts micro-batches per step"),
    ("data.workers", "the saved data position is planned over that many loader workers"),
    ("data.train", "the saved data position is a position in that data"),
    ("data.train_weights", "the saved data stream samples with those weights"),
    ("data.resampled", "the saved data position is a position in that stream"),
    ("data.samples_per_epoch", "the saved data position is planned for that epoch size"),
    ("data.shuffle_buffer", "the saved data stream is shuffled with that buffer"),
    ("seed", "the saved data stream and generators follow that seed"),
    ("model.student", "the saved weights are that model's"),
    ("model.mask", "the saved weights and gates are that masked model's"),
    ("model.teacher", "the run distils from that teacher"),
    ("model.teacher_pretrained", "the run distils from those teacher weights"),
)


def _lookup(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_resume(tag_dir: str, config: dict, world_size: int) -> dict:
    """The checkpoint's run record, if this run (its resolved `config`, `world_size` ranks) can
    continue it exactly; else ConfigError, one line naming the setting and what to do."""
    record = read_run_record(tag_dir)
    where = f"checkpoint.resume: {tag_dir}"
    advice = "or start a new run_dir"
    if record.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{where} has checkpoint format {record.get('format')!r}, this version "
                          f"reads format {FORMAT_VERSION}: start a new run_dir")
    if record["world_size"] != world_size:
        raise ConfigError(f"{where} was written by {record['world_size']} ranks, this run has "
                          f"{world_size}: the data position and the optimizer partitions are "
                          f"per rank (resuming on another world size is not supported yet); "
                          f"run on {record['world_size']} ranks {advice}")
    for key, why in RESUME_INVARIANTS:
        saved, now = _lookup(record["config"], key), _lookup(config, key)
        if saved != now:
            raise ConfigError(f"{where} was written with {key}={saved!r}, this run has "
                              f"{now!r}: {why}; set {key}={saved!r} to resume {advice}")
    return record


def check_total_steps(record: dict, total_steps: int) -> None:
    """A longer run continues (its schedule stretches); one shorter than the checkpoint cannot."""
    if total_steps < record["step"]:
        raise ConfigError(f"optim.total_steps: this run has {total_steps} steps, fewer than the "
                          f"{record['step']} its checkpoint already trained; raise it")


# --------------------------------------------------------------------------- the manager

def write_latest(checkpoint_dir: str, tag: str) -> None:
    """Point `latest` at `tag` (atomically: a reader sees the old tag or the new one)."""
    write_text_atomic(os.path.join(checkpoint_dir, LATEST), tag + "\n")


class CheckpointManager:
    def __init__(self, run_dir: str, keep_last: int, rank: int):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last
        self.rank = rank

    def save(self, engine, parts: dict[str, CheckpointPart], record: dict) -> str:
        """Collective: every rank calls it. `record` (JSON: config, world size, ...) becomes the
        tag's run.json. Returns the tag directory."""
        step = record["step"]
        tag = tag_for_step(step)
        client_state = {name: part.state_dict() for name, part in parts.items()}
        engine.save_checkpoint(self.dir, tag=tag, client_state=client_state, save_latest=False)
        if self.rank == 0:
            write_json_atomic(os.path.join(self.dir, tag, RUN_RECORD),
                              {"format": FORMAT_VERSION, **record})
        barrier()  # every rank's shards are on disk before `latest` moves
        if self.rank == 0:
            write_latest(self.dir, tag)
            self._rotate(newest=tag)
        barrier()
        return os.path.join(self.dir, tag)

    def _rotate(self, newest: str) -> None:
        """Keep the `keep_last` newest complete tags up to `newest`; drop stale partial ones."""
        newest_step = _step_of(newest)
        tags = sorted((t for t in os.listdir(self.dir) if _step_of(t) is not None), key=_step_of)
        kept = [t for t in tags if _step_of(t) <= newest_step][-self.keep_last:]
        for tag in tags:
            if tag not in kept:
                shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)

    def load(self, engine, tag_dir: str, parts: dict[str, CheckpointPart]) -> None:
        """Restore the engine (weights, optimizer, scheduler) and every part."""
        load_dir, tag = os.path.split(tag_dir.rstrip("/"))
        path, client_state = engine.load_checkpoint(load_dir, tag=tag)
        if path is None or client_state is None:
            raise FileNotFoundError(f"{tag_dir}: not a loadable DeepSpeed checkpoint")
        missing = sorted(set(parts) - set(client_state))
        if missing:
            raise FileNotFoundError(f"{tag_dir}: the checkpoint lacks part(s) "
                                    f"{', '.join(missing)}")
        for name, part in parts.items():
            part.load_state_dict(client_state[name])


def resolve_resume(run_dir: str, resume: Optional[str]) -> Optional[str]:
    """`checkpoint.resume` -> a tag directory, or None to start fresh.

    "latest" with no completed checkpoint yet starts fresh: the same command serves the first run
    and every requeue.
    """
    if resume is None:
        return None
    if resume == LATEST:
        checkpoints = os.path.join(run_dir, "checkpoints")
        tag = read_latest(checkpoints) if os.path.isdir(checkpoints) else None
        return os.path.join(checkpoints, tag) if tag else None
    return os.path.abspath(resume)
