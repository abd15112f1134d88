"""Checkpoints: save / rotate / `latest` / resume, and the student's export.

Layout under RUN_DIR/checkpoints/: one DeepSpeed tag directory per save (`step-00000100/`) and our
own `latest` file naming the newest COMPLETE tag. DeepSpeed is told `save_latest=False`; we write
`latest` only after every rank has finished writing (barrier), through a temporary file and
os.replace, so a run killed mid-save leaves `latest` on the previous good checkpoint and a
partial tag directory that resume ignores (and the next save overwrites or rotation deletes).

The client state holds what DeepSpeed does not: step, samples seen, the data position
(epoch, batches consumed into it), every rank's RNG states and the resolved config.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from training.distributed import barrier, rank_and_world

LATEST = "latest"
_TAG_RE = re.compile(r"^step-(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(tag: str) -> Optional[int]:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


@dataclass
class TrainState:
    """Where training is: what a resume must restore besides the engine."""
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # over all ranks
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per rank)


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


def _all_rng_states() -> list:
    """Every rank's RNG states (DeepSpeed stores client state from rank 0 only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def write_latest(checkpoint_dir: str, tag: str) -> None:
    """Point `latest` at `tag`: temporary file, fsync, atomic rename."""
    path = os.path.join(checkpoint_dir, LATEST)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(checkpoint_dir: str) -> Optional[str]:
    """The tag `latest` names, or None when no checkpoint was ever completed."""
    path = os.path.join(checkpoint_dir, LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise FileNotFoundError(f"{path} names {tag!r}, which does not exist")
    return tag


class CheckpointManager:
    def __init__(self, run_dir: str, keep_last: int, rank: int):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last
        self.rank = rank

    def save(self, engine, state: TrainState, config: dict) -> str:
        """Collective: every rank calls it. Returns the tag directory."""
        tag = tag_for_step(state.step)
        client_state = {"train_state": vars(state).copy(), "rng": _all_rng_states(),
                        "config": config}
        engine.save_checkpoint(self.dir, tag=tag, client_state=client_state, save_latest=False)
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

    def resolve(self, resume: Optional[str]) -> Optional[str]:
        """`checkpoint.resume` -> a tag directory, or None to start fresh.

        "latest" with no completed checkpoint yet starts fresh: the same command serves the
        first run and every requeue.
        """
        if resume is None:
            return None
        if resume == LATEST:
            tag = read_latest(self.dir) if os.path.isdir(self.dir) else None
            return os.path.join(self.dir, tag) if tag else None
        return os.path.abspath(resume)

    def load(self, engine, tag_dir: str) -> tuple[TrainState, dict]:
        """Restore engine (weights, optimizer, scheduler), this rank's RNG; return the state."""
        load_dir, tag = os.path.split(tag_dir.rstrip("/"))
        path, client_state = engine.load_checkpoint(load_dir, tag=tag)
        if path is None or client_state is None:
            raise FileNotFoundError(f"{tag_dir}: not a loadable DeepSpeed checkpoint")
        rngs = client_state["rng"]
        rank, world = rank_and_world()
        if len(rngs) == world:
            set_rng_state(rngs[rank])  # a different world size keeps fresh per-rank RNGs
        return TrainState(**client_state["train_state"]), client_state["config"]


# DeepSpeed's file holding the module and our client state (rank 0's, at ZeRO-3).
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def read_model_states(tag_dir: str) -> dict:
    for name in MODEL_STATES_FILES:
        path = os.path.join(tag_dir, name)
        if os.path.isfile(path):
            return torch.load(path, map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"{tag_dir}: not a DeepSpeed checkpoint (no {MODEL_STATES_FILES[0]})")


def student_state_dict(tag_dir: str) -> tuple[dict, dict]:
    """(full fp32 student state dict, resolved config) read from a checkpoint's files.

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer files: DeepSpeed's
    zero_to_fp32 consolidates them (the engine's 16-bit gather would lose bf16 precision).
    ZeRO-0 stores the whole module in the model-states file (in the training precision).
    Needs no process group, so an export works anywhere after the run.
    """
    model_states = read_model_states(tag_dir)
    if model_states["ds_config"]["zero_optimization"]["stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        load_dir, tag = os.path.split(tag_dir.rstrip("/"))
        state = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    else:
        state = model_states["module"]
    return {k: v.float() for k, v in state.items()}, model_states.get("config", {})


def export_checkpoint(tag_dir: str, out_dir: str) -> str:
    """Write a checkpoint's student in open_clip format (`clip-train --export`, and each run's end).

    The feature-distillation projection (`distill_projection.*`) is training-only and left out.
    A masked student (`model.mask`) is pruned first (training/inheritance/prune.py): uniform ->
    open_clip format, per_layer -> pruned_config.json + weights for `load_pruned`.
    """
    from training import models

    state, config = student_state_dict(tag_dir)
    state = {k: v for k, v in state.items() if not k.startswith("distill_projection.")}
    student = config["model"]["student"]
    if config["model"].get("mask"):
        from training.inheritance.prune import export_pruned_student
        return str(export_pruned_student(state, student, config["model"]["mask"], out_dir))
    return str(models.export_open_clip(state, student, out_dir))
