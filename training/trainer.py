"""Trainer: the training loop, readable top to bottom.

    Trainer(cfg).train()

checks the config against the files and the checkpoint to resume (preflight, before anything is
built), then builds the process group, the student (optionally from an inherited state dict),
the teacher source (training/teachers.py), the task module the engine wraps (student + trainable
heads, training/task.py), the loss, the DeepSpeed engine, the checkpoints and the metrics;
restores a checkpoint when asked; then `train()` runs optimizer steps until `total_steps`:

    micro-batches -> teacher outputs (no grad) -> task forward (student + heads)
                  -> DistillationLoss (training/objectives) + the task's regularizers -> engine.backward -> engine.step

with exact feature-cached gradient accumulation (training/accumulation.py). Each component is an
attribute built by one method, so a subclass or a test can swap any of them.

Preemption contract (docs/architecture.md): SIGUSR1 or SIGTERM sets a flag; the current step
finishes, all ranks agree (one all-reduce per step), a checkpoint is written and `train()`
returns False without writing done.json, so the job script requeues.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from training import models
from training.accumulation import feature_cached_passes, running_stat_buffers
from training.checkpoint import (CheckpointManager, DataPosition, RngStates, TrainState,
                                 check_resume, check_total_steps, resolve_resume,
                                 resume_accumulation, tag_for_step)
from training.config import STUDENT_INIT_TEACHER, TrainConfig, save_config, to_dict
from training.data import build_train_loader
from training.data.sources import parse_sources
from training.distributed import (all_reduce_flag, average_across_ranks, barrier,
                                  init_distributed, rank_info_from_env)
from training.engine import build_engine, deepspeed_config
from training.export import export_checkpoint
from training.files import write_json_atomic
from training.fusion import build_fusion
from training.metrics import MetricsLogger
from training.objectives import DistillationLoss, TermModels
from training.optim import continue_schedule, group_settings, restore_group_settings
from training.run_lock import RunLock
from training.specs import build_student, build_teacher, model_spec
from training.task import DistillationTask
from training.teachers import build_teacher_source

log = logging.getLogger("training")

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# The loader's counters reported in the metrics (summed over ranks, per epoch).
DATA_COUNTERS = ("samples_read", "corrupt_skipped", "shard_errors", "samples_repeated", "read_retries")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def preemption_flag() -> Iterator[dict]:
    """{"set": bool} that becomes True on SIGUSR1/SIGTERM; the handlers are restored after."""
    flag = {"set": False}

    def handler(signum, _frame):
        flag["set"] = True
        log.warning(f"signal {signal.Signals(signum).name}: checkpoint after this step, then exit")

    previous = {sig: signal.signal(sig, handler) for sig in PREEMPT_SIGNALS}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.resume_from, resume_record = self.preflight()  # before any process group
        self.dist = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.dist_timeout_s)
        self.device = torch.device(self.dist.device)
        seed_everything(cfg.seed)  # same student init on every rank
        student = self.build_student()
        self.teacher = build_teacher_source(cfg.model, self.device, cfg.data)
        if self.student_spec.text_from_teacher:
            self.lock_text_tower(student)
        self.loss_fn = DistillationLoss.from_config(cfg.loss)
        self.task = self.build_task(student)
        self.train_state, self.data_position = TrainState(), DataPosition()
        self.steps_per_epoch = len(self.make_loader(epoch=0)) // cfg.optim.grad_accum_steps
        self.total_steps = cfg.optim.total_steps or cfg.optim.epochs * self.steps_per_epoch
        if resume_record is not None:
            check_total_steps(resume_record, self.total_steps)
        self.engine, self.scheduler = build_engine(
            self.task, cfg, total_steps=self.total_steps, world_size=self.dist.world_size,
            load_universal=self.universal_resume)
        self.checkpoints = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep_last,
                                             self.dist.rank)
        self.last_checkpoint: Optional[str] = None
        seed_everything(cfg.seed + 1000 * self.dist.rank)  # per-rank streams from here on
        self.maybe_resume()  # restores each rank's RNG states too
        self.metrics = MetricsLogger(
            cfg.log, cfg.run_dir, rank=self.dist.rank, world_size=self.dist.world_size,
            total_steps=self.total_steps, config=to_dict(cfg),
            samples_per_step=self.samples_per_step)

    def preflight(self) -> tuple[Optional[str], Optional[dict]]:
        """Cheap checks that config validation cannot do (names, files, the checkpoint to resume
        and whether this run can continue it), before any process group or model: ValueError /
        ConfigError in one line. Returns (checkpoint tag dir or None, its run record)."""
        cfg = self.cfg
        self.lock = RunLock(cfg.run_dir)  # one trainer per run_dir; run_dir writable
        self.lock.acquire()
        self.student_spec = model_spec(cfg.model.student)
        if cfg.model.teacher:
            teacher_spec = model_spec(cfg.model.teacher)
            if self.student_spec.text_from_teacher:
                self.student_spec.check_teacher(teacher_spec)
        parse_sources(cfg.data.train, cfg.data.train_weights)  # local shards exist
        world_size = rank_info_from_env(dict(os.environ), cfg.deepspeed.backend).world_size
        tag_dir = resolve_resume(cfg.run_dir, cfg.checkpoint.resume)
        # The epoch order's lanes (training/data/order.py): fixed by the run's first world size.
        self.lanes, self.universal_resume = world_size * cfg.optim.grad_accum_steps, False
        self.resume_changes_streams = False  # resampled draws are per (rank, worker)
        if tag_dir is None:
            return None, None
        record = check_resume(tag_dir, to_dict(cfg), world_size)
        self.lanes = record["lanes"]
        accum = resume_accumulation(record, to_dict(cfg), world_size)
        if accum != cfg.optim.grad_accum_steps:
            log.warning(f"resuming {record['world_size']}-rank checkpoint on {world_size} ranks: "
                        f"optim.grad_accum_steps={accum} (was {cfg.optim.grad_accum_steps}) keeps "
                        f"its global batch of {record['global_batch']} samples per step")
            cfg.optim.grad_accum_steps = accum
        # Optimizer partitions of another world size: DeepSpeed's universal checkpoint.
        self.universal_resume = (record["world_size"] != world_size
                                 and record["zero_stage"] > 0)
        self.resume_changes_streams = (record["world_size"] != world_size or
                                       record["config"]["data"]["workers"] != cfg.data.workers)
        return tag_dir, record

    # ---- components (one method each, swappable) -------------------------------------------
    def build_student(self) -> torch.nn.Module:
        """The student model, or with `model.mask` the same model wrapped in L0 gates; from
        model.student_init: a file, or `teacher` (inherited here, the same tensors on every
        rank; skipped on resume, where the checkpoint's weights replace them)."""
        cfg = self.cfg.model
        init = cfg.student_init
        if init == STUDENT_INIT_TEACHER:
            init = None if self.resume_from is not None else self.inherited_from_teacher()
        if cfg.mask is None:
            return build_student(self.student_spec, init)[0]
        from training.inheritance.masked_clip import build_masked_student
        mask = cfg.mask
        return build_masked_student(cfg.student, init, mask.target_sparsity,
                                    mask.start_sparsity, mask.warmup_steps, lr=mask.lr)

    def inherited_from_teacher(self) -> dict[str, torch.Tensor]:
        """`clip-inherit`'s default rule from model.teacher(_pretrained), in this process."""
        from training.inheritance.inherit import inherit_from_teacher
        cfg = self.cfg.model
        try:
            state = inherit_from_teacher(cfg.teacher, cfg.teacher_pretrained, cfg.student)
        except ValueError as err:
            raise ValueError(f"key model.student_init: {STUDENT_INIT_TEACHER}: {err}") from None
        log.info(f"student initialised from {cfg.teacher} ({cfg.teacher_pretrained}) by "
                 f"manual inheritance (clip-inherit's default rule)")
        return state

    def lock_text_tower(self, student: torch.nn.Module) -> None:
        """A LiT student (`lit:`): the teacher's text tower copied in and frozen: the live
        teacher's very weights, or model.teacher_pretrained's (stored embeddings: no model)."""
        cfg = self.cfg.model
        teacher = getattr(self.teacher, "model", None)
        if teacher is None:
            teacher = build_teacher(cfg.teacher, cfg.teacher_pretrained)[0]
        self.student_spec.freeze_text_tower(student, teacher.state_dict())

    def build_task(self, student: torch.nn.Module) -> DistillationTask:
        """The student and the trainable heads the loss's terms need, as the one module the
        engine wraps (e.g. a feature projection between models of different widths, a learned
        temperature, the uncertainty balancer's log-variances, intermediate blocks' alignment
        MLPs), with the token-level outputs the terms read; plus model.fusion's head."""
        teacher_dim = self.teacher.embed_dim if self.teacher is not None else None
        heads, token_outputs = self.loss_fn.task_parts(
            TermModels(student, self.teacher, self.student_spec.embed_dim, teacher_dim))
        if self.cfg.model.fusion is not None:  # KDEOV's FiLM / cross-attention (training/fusion.py)
            heads["fusion"] = build_fusion(self.cfg.model.fusion, self.student_spec.embed_dim,
                                           teacher_dim)
        task = DistillationTask(student, heads, token_outputs=token_outputs)
        return models.make_deepspeed_safe(task)

    def make_loader(self, epoch: int, skip_batches: int = 0):
        """This rank's loader for one epoch, from `skip_batches` on (cheap: built per epoch).
        The teacher's tokenizer runs in the loader only when its ids differ from the student's."""
        teacher = self.teacher
        student_tokenizer = self.student_spec.tokenizer
        teacher_tokenizer = None
        if teacher is not None and not student_tokenizer.same_ids_as(teacher.tokenizer):
            teacher_tokenizer = teacher.tokenizer
        return build_train_loader(
            self.cfg.data, seed=self.cfg.seed, student_preprocess=self.student_spec.preprocess_cfg,
            teacher_preprocess=teacher.preprocess_cfg if teacher is not None else None,
            tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer,
            rank=self.dist.rank, world_size=self.dist.world_size, epoch=epoch,
            skip_batches=skip_batches, accum=self.cfg.optim.grad_accum_steps, lanes=self.lanes,
            stream=self.data_position.stream if epoch == self.data_position.epoch else "",
            embeddings=teacher.embeddings if teacher is not None else None)

    @property
    def samples_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.optim.grad_accum_steps * self.dist.world_size

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> bool:
        """Run to `total_steps`. True when finished (done.json written), False when preempted."""
        cfg, progress = self.cfg, self.train_state
        if self.dist.is_main:
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
            write_json_atomic(os.path.join(cfg.run_dir, "deepspeed_config.json"),
                              deepspeed_config(cfg, self.dist.world_size))
        log.info(f"training {self.total_steps} steps from step {progress.step} in {cfg.run_dir}: "
                 f"{self.samples_per_step} samples/step, {self.steps_per_epoch} steps/epoch, "
                 f"world {self.dist.world_size}, ZeRO-{cfg.deepspeed.zero_stage}, "
                 f"{cfg.deepspeed.precision}")
        dropped = self.make_loader(self.data_position.epoch).plan.dropped
        if dropped:
            log.info(f"{dropped} samples per epoch are not trained on (fewer than the global "
                     f"batch of {self.samples_per_step} left at the end of the epoch's order)")
        with preemption_flag() as preempt:
            for micro_batches, data_wait_s in self.step_batches():
                values = self.train_step(micro_batches)
                progress.step += 1
                progress.samples_seen += self.samples_per_step
                self.after_step(values, data_wait_s)
                if all_reduce_flag(preempt["set"]):
                    self.save_checkpoint()  # no-op if this step was just saved
                    log.warning(f"preempted at step {progress.step}: checkpoint written")
                    self.release_lock()
                    return False
        self.finish()
        self.release_lock()
        return True

    def step_batches(self) -> Iterator[tuple[list[dict], float]]:
        """Groups of grad_accum_steps micro-batches, resuming at the saved data position (a
        global sample count: this rank skips its micro-batches of the steps trained)."""
        accum, position = self.cfg.optim.grad_accum_steps, self.data_position
        while self.train_state.step < self.total_steps:
            steps_done = position.samples // self.samples_per_step
            self.loader = self.make_loader(position.epoch, steps_done * accum)
            # The loader draws from the global torch RNG (the iterator's base seed; with 0
            # workers, reading samples in this process, skipped ones included, though its own
            # randomness is seeded). Keep those draws out of the training stream (a masked
            # student samples its gates from it), or a resumed run would sample other gates.
            with torch.random.fork_rng(devices=[]):
                batches = iter(self.loader)
            start = time.perf_counter()
            for _ in range(self.steps_per_epoch - steps_done):
                with torch.random.fork_rng(devices=[]):
                    group = [next(batches) for _ in range(accum)]
                position.samples += self.samples_per_step
                yield group, time.perf_counter() - start
                if self.train_state.step >= self.total_steps:
                    return
                start = time.perf_counter()
            position.epoch, position.samples, position.stream = position.epoch + 1, 0, ""

    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step over the micro-batches; the gradient is the full batch's."""
        rates = dict(zip((g["name"] for g in self.scheduler.optimizer.param_groups),
                         self.scheduler.get_last_lr()))  # the rates this step uses
        micro_batches = [self.to_device(mb) for mb in micro_batches]  # once, not per pass
        teacher = self.teacher_outputs(micro_batches)
        if self.student_spec.text_from_teacher:
            self.share_text_features(micro_batches, teacher)
        regularization = {}
        for index, student in feature_cached_passes(self.student_outputs, micro_batches,
                                                    self.task, self.device):
            losses = self.loss_fn(student, teacher, step=self.train_state.step)
            loss = losses["loss"]
            if index == 0:  # batch-independent terms: counted once per optimizer step
                regularization = self.task.regularization(self.train_state.step)
                loss = loss + sum(regularization.values())
            self.engine.backward(loss, scale_wrt_gas=False)  # each pass is the full-batch loss
            self.engine.step()
        losses.update({f"loss_{name}": value for name, value in regularization.items()})
        losses.update(self.task.metrics(self.train_state.step))
        losses["lr"] = torch.tensor(rates.get("decay", self.scheduler.get_last_lr()[0]),
                                    dtype=torch.float64)
        losses.update({f"lr/{group.name}": torch.tensor(rates[group.name], dtype=torch.float64)
                       for group in self.cfg.optim.param_groups if group.name in rates})
        return {k: v.detach() for k, v in losses.items()}

    def to_device(self, batch: dict) -> dict:
        """The batch's tensors on this rank's device, each moved once: a view that is another
        key's very tensor (the teacher's image or ids when they equal the student's) stays so."""
        moved: dict[int, torch.Tensor] = {}
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                if id(value) not in moved:
                    moved[id(value)] = value.to(self.device, non_blocking=True)
                value = moved[id(value)]
            out[key] = value
        return out

    def student_outputs(self, batch: dict) -> dict:
        if "frozen_text_features" in batch:  # a LiT student: the teacher's text features
            return self.engine(batch["image"], None, text_features=batch["frozen_text_features"])
        return self.engine(batch["image"], batch["text"], text_length=batch.get("text_length"))

    @staticmethod
    def share_text_features(micro_batches: list[dict], teacher: dict) -> None:
        """A LiT student's text tower IS the teacher's (frozen, same weights and ids): each
        micro-batch takes its rows of the teacher's text features, computed once per step by the
        teacher source, instead of running the same tower again (twice with feature caching)."""
        start = 0
        for batch in micro_batches:
            rows = batch["image"].shape[0]
            batch["frozen_text_features"] = teacher["text_features"][start:start + rows]
            start += rows

    def teacher_outputs(self, micro_batches: list[dict]) -> Optional[dict]:
        return self.teacher.outputs(micro_batches) if self.teacher is not None else None

    # ---- what happens between steps ---------------------------------------------------------
    def after_step(self, values: dict[str, torch.Tensor], data_wait_s: float) -> None:
        cfg, step = self.cfg, self.train_state.step
        self.metrics.step_done(data_wait_s)
        if step % cfg.log.every_steps == 0 or step == self.total_steps:
            self.metrics.log_train(step, self.averaged(values))
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            self.evaluate()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            self.save_checkpoint()

    def averaged(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """This step's values averaged over ranks, the epoch's data counters summed over ranks,
        and the epoch."""
        names = sorted(values)
        means = torch.stack([values[n].to(self.device, torch.float64) for n in names])
        data = self.data_counters()
        sums = torch.tensor(list(data.values()), dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(means)
            dist.all_reduce(sums)
            means /= self.dist.world_size
        out = dict(zip(names, means.tolist()))
        out.update(zip(data, sums.tolist()))
        out["data/samples_dropped"] = self.loader.plan.dropped  # per epoch, the same on every rank
        out["epoch"] = self.data_position.epoch
        return out

    def data_counters(self) -> dict[str, float]:
        """The loader's per-rank counts for this epoch (corrupt samples by reason, ...).

        Reasons differ between ranks, so every rank reports the same fixed set of keys.
        """
        stats = self.loader.stats()
        return {f"data/{k}": float(stats.get(k, 0)) for k in DATA_COUNTERS}

    def sync_running_stats(self) -> None:
        """BatchNorm's running statistics: each rank updates them from its own micro-batches, but
        the model that is evaluated (a set split over ranks), checkpointed and exported is one:
        their mean over ranks. Done where they are read, not after every step: the update is
        linear (an EMA or a running mean), so one average before a read equals averaging after
        each step, and a step needs no collective for it."""
        average_across_ranks(running_stat_buffers(self.task))

    def evaluate(self) -> dict:
        from training.evaluation.periodic import run_periodic_eval
        self.sync_running_stats()
        results = run_periodic_eval(self.task.student, self.cfg.eval, self.dist,
                                    tokenizer=self.student_spec.tokenizer,
                                    preprocess_cfg=self.student_spec.preprocess_cfg)
        self.metrics.log_eval(self.train_state.step, results)
        return results

    # ---- checkpoints ------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict:
        """What a checkpoint holds besides the engine's module, optimizer and scheduler."""
        return {"train_state": self.train_state, "data_position": self.data_position,
                "rng": RngStates(), **self.loss_fn.checkpoint_parts()}

    def run_record(self) -> dict:
        """The JSON facts of this run a resume is checked against (checkpoint.check_resume)."""
        return {"step": self.train_state.step, "total_steps": self.total_steps,
                "world_size": self.dist.world_size, "global_batch": self.samples_per_step,
                "lanes": self.lanes,
                "zero_stage": self.cfg.deepspeed.zero_stage, "config": to_dict(self.cfg)}

    def save_checkpoint(self) -> str:
        """Save this step (once: a step saved already is not written again)."""
        tag = tag_for_step(self.train_state.step)
        if self.last_checkpoint is None or os.path.basename(self.last_checkpoint) != tag:
            self.sync_running_stats()  # the checkpoint (and the export made from it) is one model
            self.last_checkpoint = self.checkpoints.save(self.engine, self.checkpoint_parts(),
                                                         self.run_record())
        return self.last_checkpoint

    def maybe_resume(self) -> None:
        """Restore the checkpoint preflight accepted; the learning rate then follows THIS run's
        schedule (e.g. a raised total_steps) from the restored step."""
        if self.resume_from is None:
            return
        base_lrs = list(self.scheduler.base_lrs)  # this run's config
        settings = group_settings(self.scheduler.optimizer)
        self.checkpoints.load(self.engine, self.resume_from, self.checkpoint_parts(),
                              universal=self.universal_resume)
        restore_group_settings(self.scheduler.optimizer, settings)
        continue_schedule(self.scheduler, base_lrs)
        self.last_checkpoint = self.resume_from
        position = self.data_position
        if self.cfg.data.resampled and self.resume_changes_streams:
            position.stream = f"{position.samples}@{self.dist.world_size}:"  # new draws
        log.info(f"resumed from {self.resume_from} at step {self.train_state.step} "
                 f"(epoch {position.epoch}, {position.samples} samples of it trained)")

    def finish(self) -> None:
        """Final checkpoint, evaluation, export; done.json last (its presence means complete)."""
        cfg = self.cfg
        self.save_checkpoint()
        step = self.train_state.step
        evaluated_now = cfg.eval.every_steps and step % cfg.eval.every_steps == 0
        if cfg.eval.at_end and (cfg.eval.val or cfg.eval.zeroshot) and not evaluated_now:
            self.evaluate()
        export = os.path.join(cfg.run_dir, "export") if cfg.checkpoint.export_at_end else None
        if export:
            self.export(export)
        if self.dist.is_main:
            write_json_atomic(os.path.join(cfg.run_dir, "done.json"),
                              {"step": step, "samples_seen": self.train_state.samples_seen,
                               "checkpoint": self.last_checkpoint, "time": time.time()})
        self.metrics.summary(step, self.train_state.samples_seen, export)
        self.metrics.close()

    def release_lock(self) -> None:
        barrier()  # every rank is done with the run folder
        if self.dist.is_main:
            self.lock.release()

    def export(self, out_dir: str) -> Optional[str]:
        """The student as a model folder (open_clip format), from the last checkpoint (rank 0)."""
        barrier()
        if not self.dist.is_main:
            return None
        return str(export_checkpoint(self.last_checkpoint, out_dir))
