"""Checkpoints made of named parts: save / rotate / `latest` / resume, and the resume check.

Layout under RUN_DIR/checkpoints/: one DeepSpeed tag directory per save (`step-00000100/`) holding
DeepSpeed's files (the task module, optimizer, scheduler, our client state) plus our own
`run.json` and `manifest.json` (every file's size and sha256), and our own `latest` file naming
the newest COMPLETE tag. DeepSpeed is told `save_latest=False`; after every rank has written
(barrier) rank 0 writes the manifest, then `latest`, atomically, so a run killed mid-save leaves
`latest` on the previous good checkpoint and a tag without manifest that resume ignores (and
rotation deletes). A `latest` that is damaged falls back to the newest tag that verifies
(training/checkpoint_files.py), never to step 0 while checkpoints exist. Every load is
weights_only (checkpoint_files.weights_only_loads), DeepSpeed's own included.

The client state is a dict of named parts, each saving and loading itself (CheckpointPart):
`train_state` (steps, samples), `data_position` (epoch and the samples of it trained: a global
count, valid on any world size), `rng` (every rank's generators). The task's own non-parameter
state rides in the module's state dict (training/task.py). `run.json` (JSON, read without
unpickling anything) records what the run was: the resolved config, world size, ZeRO stage, the
global batch and the epoch order's lanes, the step. Before anything is built, `check_resume`
compares it with the new run and refuses, in one line naming the setting, what cannot continue;
another world size continues with the accumulation steps that keep the global batch
(`resume_accumulation`) and, at ZeRO 1-3, DeepSpeed's universal form of the tag (`to_universal`).
"""
from __future__ import annotations

import errno
import os
import random
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from training.checkpoint_files import (FORMAT_VERSION, LATEST, MANIFEST, RUN_RECORD,
                                       manifest_of, read_latest, read_run_record, step_of,
                                       verify_tag, weights_only_loads)
from training.config_files import ConfigError
from training.distributed import barrier, rank_and_world
from training.files import write_json_atomic, write_text_atomic

DISK_FULL_BYTES = 16 * 2**20  # a save failing with less free than this failed for want of space
UNIVERSAL = "universal"  # RUN_DIR/checkpoints/universal/<tag>: a conversion in use


def tag_for_step(step: int) -> str:
    return f"step-{step:08d}"


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
    """Where in the data training is: `samples` of `epoch` trained, a global count over all ranks
    in the epoch's global order (training/data/order.py), so it holds for any world size.
    `stream` seeds resampled draws; a resume on another world size starts new draws."""
    epoch: int = 0
    samples: int = 0
    stream: str = ""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.samples = int(state["epoch"]), int(state["samples"])
        self.stream = str(state["stream"])


def rng_state() -> dict:
    """The generators' states as tensors and plain Python values (weights_only-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
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
        """On another world size the ranks keep their fresh per-rank seeds (the data does not
        depend on them: every sample's randomness is seeded by its position)."""
        rank, world = rank_and_world()
        if len(state["ranks"]) == world:
            set_rng_state(state["ranks"][rank])


# --------------------------------------------------------------------------- the resume check

# Settings a checkpoint can only continue under unchanged: (dotted key, why).
RESUME_INVARIANTS = (
    ("deepspeed.zero_stage", "the optimizer state is partitioned for that stage"),
    ("deepspeed.precision", "the saved weights and optimizer state are in that precision"),
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
    ("model.teacher_source", "the run distils from that teacher source"),
    ("model.teacher_embeddings", "the run distils from that stored embedding set"),
    ("model.ensemble", "the run distils from that teacher ensemble"),
    ("model.fusion", "the saved weights include that fusion head"),
    ("optim.param_groups", "the saved optimizer state is grouped by them"),
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
    for key, why in RESUME_INVARIANTS:
        saved, now = _lookup(record["config"], key), _lookup(config, key)
        if saved != now:
            raise ConfigError(f"{where} was written with {key}={saved!r}, this run has "
                              f"{now!r}: {why}; set {key}={saved!r} to resume {advice}")
    resume_accumulation(record, config, world_size, where)
    return record


def resume_accumulation(record: dict, config: dict, world_size: int,
                        where: str = "checkpoint.resume") -> int:
    """The micro-batches per step that keep the checkpoint's global batch on `world_size` ranks
    of `data.batch_size` samples, so the schedule and the samples per step do not change
    whatever the world size; ConfigError in one line where no whole number does."""
    saved, batch = record["global_batch"], config["data"]["batch_size"]
    was = (f"a global batch of {saved} samples per step (data.batch_size="
           f"{record['config']['data']['batch_size']} x optim.grad_accum_steps="
           f"{record['config']['optim']['grad_accum_steps']} x {record['world_size']} ranks)")
    if saved % world_size:
        raise ConfigError(f"{where} trained with {was}, which {world_size} ranks cannot share "
                          f"equally: run on a number of ranks that divides {saved}")
    per_rank = saved // world_size
    if per_rank % batch:
        fits = max(d for d in range(1, min(batch, per_rank) + 1) if per_rank % d == 0)
        raise ConfigError(f"{where} trained with {was}: {per_rank} per rank on {world_size} "
                          f"ranks, which data.batch_size={batch} does not divide; set "
                          f"data.batch_size={fits} (or another divisor of {per_rank})")
    accum = per_rank // batch
    if accum > 1 and _lookup(config, "model.mask") is not None:
        raise ConfigError(f"{where} trained with {was}: on {world_size} ranks that needs "
                          f"optim.grad_accum_steps={accum}, and model.mask needs 1; run on "
                          f"{record['world_size']} ranks")
    return accum


def check_total_steps(record: dict, total_steps: int) -> None:
    """A longer run continues (its schedule stretches); one shorter than the checkpoint cannot."""
    if total_steps < record["step"]:
        raise ConfigError(f"optim.total_steps: this run has {total_steps} steps, fewer than the "
                          f"{record['step']} its checkpoint already trained; raise it")


# --------------------------------------------------------------------------- the manager

class CheckpointSaveError(ValueError):
    """A checkpoint could not be written for a reason the user fixes (a full disk)."""


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
        try:
            engine.save_checkpoint(self.dir, tag=tag, client_state=client_state,
                                   save_latest=False)
            if self.rank == 0:
                write_json_atomic(os.path.join(self.dir, tag, RUN_RECORD),
                                  {"format": FORMAT_VERSION, **record})
            barrier()  # every rank's shards are on disk before the manifest and `latest`
            if self.rank == 0:
                write_json_atomic(os.path.join(self.dir, tag, MANIFEST),
                                  manifest_of(os.path.join(self.dir, tag)))
                write_latest(self.dir, tag)
                self._rotate(newest=tag)
        except Exception as err:
            self._raise_if_disk_full(err, tag)
            raise
        barrier()
        return os.path.join(self.dir, tag)

    def _raise_if_disk_full(self, err: Exception, tag: str) -> None:
        """A save that failed for want of space (DeepSpeed's torch.save reports it as a
        RuntimeError without errno, so the free space decides): CheckpointSaveError in one line.
        The half-written tag is removed (it has no manifest: resume would ignore it anyway)."""
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        free = shutil.disk_usage(self.dir).free
        if not (full or free < DISK_FULL_BYTES):
            return
        shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)
        try:
            previous = read_latest(self.dir)
        except ValueError:
            previous = None
        raise CheckpointSaveError(
            f"checkpoint {os.path.join(self.dir, tag)}: the disk is full ({free // 2**20} MiB "
            f"free on the disk holding {self.dir}) while saving it; the last good checkpoint "
            f"is {previous or 'none'}: free space, then resume with checkpoint.resume=latest") \
            from None

    def _rotate(self, newest: str) -> None:
        """Keep the `keep_last` newest complete tags up to `newest` (just written and complete:
        never deleted); drop older or stale partial ones. Complete means a manifest: a tag
        whose save never finished does not count towards keep_last."""
        newest_step = step_of(newest)
        tags = sorted((t for t in os.listdir(self.dir) if step_of(t) is not None), key=step_of)
        complete = [t for t in tags if step_of(t) <= newest_step
                    and os.path.isfile(os.path.join(self.dir, t, MANIFEST))]
        kept = set(complete[-self.keep_last:]) | {newest}
        for tag in tags:
            if tag not in kept:
                shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)

    def load(self, engine, tag_dir: str, parts: dict[str, CheckpointPart],
             universal: bool = False) -> None:
        """Restore the engine (weights, optimizer, scheduler) and every part. `universal`: the
        tag was written on another world size at ZeRO 1-3; load DeepSpeed's universal form of
        it (made here, by rank 0, then removed; the engine was built with load_universal)."""
        weights_only_loads()  # DeepSpeed's own torch.load calls too (ds_to_universal's as well)
        source = tag_dir
        if universal:
            if self.rank == 0:
                to_universal(tag_dir, self.universal_dir(tag_dir))
            barrier()
            source = self.universal_dir(tag_dir)
        load_dir, tag = os.path.split(source.rstrip("/"))
        path, client_state = engine.load_checkpoint(load_dir, tag=tag)
        if universal:
            barrier()
            if self.rank == 0:
                shutil.rmtree(os.path.dirname(source), ignore_errors=True)
        if path is None or client_state is None:
            raise FileNotFoundError(f"{tag_dir}: not a loadable DeepSpeed checkpoint")
        missing = sorted(set(parts) - set(client_state))
        if missing:
            raise FileNotFoundError(f"{tag_dir}: the checkpoint lacks part(s) "
                                    f"{', '.join(missing)}")
        for name, part in parts.items():
            part.load_state_dict(client_state[name])


    def universal_dir(self, tag_dir: str) -> str:
        return os.path.join(self.dir, UNIVERSAL, os.path.basename(tag_dir.rstrip("/")))


def to_universal(tag_dir: str, out_dir: str) -> None:
    """DeepSpeed's ds_to_universal: the ZeRO 1-3 partitions of a tag as one file per parameter
    (fp32 weights and optimizer moments), loadable on any world size. Output hidden unless it
    fails; a stale half conversion is replaced."""
    import argparse
    import contextlib
    import io
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out_dir, ignore_errors=True)
    args = argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # ZeRO-1/2 tags lack DeepSpeed's universal_checkpoint_info marker
                              inject_missing_state=True)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal(args)
    except Exception as err:
        raise RuntimeError(f"{tag_dir}: DeepSpeed's ds_to_universal failed ({err}); its output:\n"
                           f"{output.getvalue()[-3000:]}") from err


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
    verify_tag(resume)
    return os.path.abspath(resume)
