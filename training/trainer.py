"""Trainer: the training loop, readable top to bottom.

    Trainer(cfg).train()

builds (in `__init__`) the process group, the student (optionally from an inherited state dict),
the frozen teacher, the loss, the DeepSpeed engine, the checkpoints and the metrics; restores a
checkpoint when asked; then `train()` runs optimizer steps until `total_steps`:

    micro-batches -> teacher encode (no grad) -> student forward -> DistillationLoss
                  -> engine.backward -> engine.step

with exact feature-cached gradient accumulation (training/accumulation.py). Each component is an
attribute built by one method, so a subclass or a test can swap any of them.

Preemption contract (docs/architecture.md): SIGUSR1 or SIGTERM sets a flag; the current step
finishes, all ranks agree (one all-reduce per step), a checkpoint is written and `train()`
returns False without writing done.json, so the job script requeues.
"""
from __future__ import annotations

import json
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
from training.accumulation import concat_outputs, with_live_micro_batch
from training.checkpoint import (CheckpointManager, TrainState, export_checkpoint,
                                 tag_for_step)
from training.config import TrainConfig, save_config, to_dict
from training.data import build_train_loader
from training.data.sources import parse_sources
from training.distributed import all_reduce_flag, barrier, init_distributed
from training.engine import build_engine, deepspeed_config
from training.losses import DistillationLoss
from training.metrics import MetricsLogger

log = logging.getLogger("training")

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# The loader's counters reported in the metrics (summed over ranks, per epoch).
DATA_COUNTERS = ("samples_read", "corrupt_skipped", "shard_errors", "samples_repeated")


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
        self.preflight()
        self.dist = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.dist_timeout_s)
        self.device = torch.device(self.dist.device)
        seed_everything(cfg.seed)  # same student init on every rank
        self.student, self.student_info = self.build_student()
        self.teacher, self.teacher_info = self.build_teacher()
        self.loss_fn = self.build_loss()
        self.state = TrainState()
        self.steps_per_epoch = len(self.make_loader(epoch=0)) // cfg.optim.grad_accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"data.train: fewer than optim.grad_accum_steps="
                             f"{cfg.optim.grad_accum_steps} batches per epoch per rank")
        self.total_steps = cfg.optim.total_steps or cfg.optim.epochs * self.steps_per_epoch
        self.engine, self.scheduler = build_engine(
            self.student, cfg, total_steps=self.total_steps, world_size=self.dist.world_size)
        self.checkpoints = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep_last,
                                             self.dist.rank)
        self.last_checkpoint: Optional[str] = None
        seed_everything(cfg.seed + 1000 * self.dist.rank)  # per-rank streams from here on
        self.maybe_resume()  # restores each rank's RNG states too
        self.metrics = MetricsLogger(
            cfg.log, cfg.run_dir, rank=self.dist.rank, world_size=self.dist.world_size,
            total_steps=self.total_steps, config=to_dict(cfg),
            samples_per_step=self.samples_per_step)

    def preflight(self) -> None:
        """Cheap checks of names and files that config validation cannot do (raise ValueError)."""
        models.resolve_model_name(self.cfg.model.student)
        if self.cfg.model.teacher:
            models.resolve_model_name(self.cfg.model.teacher)
        parse_sources(self.cfg.data.train, self.cfg.data.train_weights)  # local shards exist

    # ---- components (one method each, swappable) -------------------------------------------
    def build_student(self):
        """The open_clip student, or with `model.mask` the same model wrapped in L0 gates."""
        cfg = self.cfg.model
        if cfg.mask is None:
            model, info = models.build_student(cfg.student, cfg.student_init)
        else:
            from training.inheritance.masked_clip import build_masked_student
            mask = cfg.mask
            model = build_masked_student(cfg.student, cfg.student_init, mask.target_sparsity,
                                         mask.start_sparsity, mask.warmup_steps)
            info = models.model_info(model.clip, models.resolve_model_name(cfg.student))
        return models.make_deepspeed_safe(model), info

    def build_teacher(self):
        if self.cfg.model.teacher is None:
            return None, None
        teacher, info = models.build_teacher(self.cfg.model.teacher,
                                             self.cfg.model.teacher_pretrained,
                                             self.cfg.model.teacher_dtype)
        return teacher.to(self.device), info

    def build_loss(self) -> DistillationLoss:
        """The objective. A feature-distillation projection (student and teacher widths differ)
        is trained with the student: it is attached to it as `distill_projection`, so the engine
        owns, checkpoints and optimises it; the export leaves it out."""
        loss = self.cfg.loss
        loss_fn = DistillationLoss(
            affinity_weight=loss.affinity_weight, clip_weight=loss.clip_weight,
            feature_weight=loss.feature_weight, feature_kind=loss.feature_kind,
            fixed_logit_scale=loss.fixed_logit_scale, student_dim=self.student_info.embed_dim,
            teacher_dim=self.teacher_info.embed_dim if self.teacher_info else None)
        if loss_fn.projection is not None:
            if self.cfg.optim.grad_accum_steps > 1:
                # Its gradient would be counted once per micro-batch pass (it sees every row).
                raise ValueError("optim.grad_accum_steps > 1 is not supported with a feature "
                                 "projection (loss.feature_weight > 0, student and teacher "
                                 "embed_dim differ)")
            self.student.distill_projection = loss_fn.projection
        return loss_fn

    def make_loader(self, epoch: int, skip_batches: int = 0):
        """This rank's loader for one epoch, from `skip_batches` on (cheap: built per epoch)."""
        return build_train_loader(
            self.cfg.data, student_preprocess=self.student_info.preprocess_cfg,
            teacher_preprocess=self.teacher_info.preprocess_cfg if self.teacher_info else None,
            tokenizer=self.student_info.tokenizer, rank=self.dist.rank,
            world_size=self.dist.world_size, epoch=epoch, skip_batches=skip_batches,
            seed=self.cfg.seed)

    @property
    def samples_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.optim.grad_accum_steps * self.dist.world_size

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> bool:
        """Run to `total_steps`. True when finished (done.json written), False when preempted."""
        cfg = self.cfg
        if self.dist.is_main:
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
            with open(os.path.join(cfg.run_dir, "deepspeed_config.json"), "w") as f:
                json.dump(deepspeed_config(cfg, self.dist.world_size), f, indent=1)
        log.info(f"training {self.total_steps} steps from step {self.state.step}: "
                 f"{self.samples_per_step} samples/step, {self.steps_per_epoch} steps/epoch, "
                 f"world {self.dist.world_size}, ZeRO-{cfg.deepspeed.zero_stage}, "
                 f"{cfg.deepspeed.precision}")
        with preemption_flag() as preempt:
            for micro_batches, data_wait_s in self.step_batches():
                values = self.train_step(micro_batches)
                self.state.step += 1
                self.state.samples_seen += self.samples_per_step
                self.after_step(values, data_wait_s)
                if all_reduce_flag(preempt["set"]):
                    self.save_checkpoint()  # no-op if this step was just saved
                    log.warning(f"preempted at step {self.state.step}: checkpoint written")
                    return False
        self.finish()
        return True

    def step_batches(self) -> Iterator[tuple[list[dict], float]]:
        """Groups of grad_accum_steps micro-batches, resuming at the saved data position."""
        accum = self.cfg.optim.grad_accum_steps
        while self.state.step < self.total_steps:
            self.loader = self.make_loader(self.state.epoch, self.state.batches_in_epoch)
            # The loader draws from the global torch RNG (the iterator's base seed; with 0
            # workers, reading samples in this process, skipped ones included, though its own
            # randomness is seeded). Keep those draws out of the training stream (a masked
            # student samples its gates from it), or a resumed run would sample other gates.
            with torch.random.fork_rng(devices=[]):
                batches = iter(self.loader)
            start = time.perf_counter()
            for _ in range(self.steps_per_epoch - self.state.batches_in_epoch // accum):
                with torch.random.fork_rng(devices=[]):
                    group = [next(batches) for _ in range(accum)]
                self.state.batches_in_epoch += accum
                yield group, time.perf_counter() - start
                if self.state.step >= self.total_steps:
                    return
                start = time.perf_counter()
            self.state.epoch, self.state.batches_in_epoch = self.state.epoch + 1, 0

    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step over the micro-batches; the gradient is the full batch's."""
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        micro_batches = [self.to_device(mb) for mb in micro_batches]  # once, not per pass
        teacher = self.teacher_outputs(micro_batches)
        cached, extra = None, {}
        if len(micro_batches) > 1:
            with torch.no_grad():
                cached = [self.student_outputs(mb) for mb in micro_batches]
        for index, micro_batch in enumerate(micro_batches):
            live = self.student_outputs(micro_batch)
            student = live if cached is None else with_live_micro_batch(cached, live, index)
            losses = self.loss_fn(student, teacher)
            loss = losses["loss"]
            if index == 0:  # batch-independent terms: counted once per optimizer step
                extra = self.regularization()
                loss = loss + sum(extra.values())
            self.engine.backward(loss, scale_wrt_gas=False)  # each pass is the full-batch loss
            self.engine.step()
        losses.update({f"loss_{name}": value for name, value in extra.items()})
        losses.update(self.mask_metrics())
        losses["lr"] = torch.tensor(lr, dtype=torch.float64)
        losses["logit_scale"] = self.scale_used(student)
        if teacher is not None:
            losses["teacher_logit_scale"] = self.scale_used(teacher)
        return {k: v.detach() for k, v in losses.items()}

    def scale_used(self, outputs: dict) -> torch.Tensor:
        """The logit scale the loss applied: the forced one (loss.fixed_logit_scale) or the
        model's own."""
        fixed = self.cfg.loss.fixed_logit_scale
        if fixed is not None:
            return torch.tensor(float(fixed))
        return outputs["logit_scale"].detach().reshape(())

    def to_device(self, batch: dict) -> dict:
        """The batch's tensors on this rank's device; a teacher view that is the student's own
        tensor (same preprocessing) stays one tensor, moved once."""
        moved = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        if batch.get("teacher_image") is batch["image"]:
            moved["teacher_image"] = moved["image"]
        return moved

    def student_outputs(self, batch: dict) -> dict:
        return models.encode(self.engine, batch["image"], batch["text"])

    @torch.no_grad()
    def teacher_outputs(self, micro_batches: list[dict]) -> Optional[dict]:
        if self.teacher is None:
            return None
        outputs = [models.encode(self.teacher, mb["teacher_image"],
                                 self.teacher_tokens(mb).to(self.device)) for mb in micro_batches]
        return concat_outputs(outputs)

    def teacher_tokens(self, batch: dict) -> torch.Tensor:
        """The student's tokens, or the captions re-tokenized when the teacher's context differs."""
        if self.teacher_info.context_length == self.student_info.context_length:
            return batch["text"]
        return self.teacher_info.tokenizer(batch["caption"])

    def regularization(self) -> dict[str, torch.Tensor]:
        """Extra terms a masked (auto-inheritance) student asks for, e.g. its L0 Lagrangian."""
        hook = getattr(self.engine.module, "regularization_losses", None)
        return dict(hook(self.state.step)) if hook is not None else {}

    def mask_metrics(self) -> dict[str, torch.Tensor]:
        """A masked student's multipliers and expected sparsity after this step, and the target
        this step's Lagrangian used."""
        hook = getattr(self.engine.module, "sparsity_metrics", None)
        return dict(hook(self.state.step)) if hook is not None else {}

    # ---- what happens between steps ---------------------------------------------------------
    def after_step(self, values: dict[str, torch.Tensor], data_wait_s: float) -> None:
        cfg, step = self.cfg, self.state.step
        self.metrics.step_done(data_wait_s)
        if step % cfg.log.every_steps == 0 or step == self.total_steps:
            self.metrics.log_train(step, self.averaged(values))
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            self.evaluate()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            self.save_checkpoint()

    def averaged(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """This step's values averaged over ranks, lr, and the epoch's data counters summed."""
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
        out["epoch"] = self.state.epoch
        return out

    def data_counters(self) -> dict[str, float]:
        """The loader's per-rank counts for this epoch (corrupt samples by reason, ...).

        Reasons differ between ranks, so every rank reports the same fixed set of keys.
        """
        stats = self.loader.stats()
        counters = {f"data/{k}": float(stats.get(k, 0)) for k in DATA_COUNTERS}
        return counters

    def evaluate(self) -> dict:
        from training.evaluation.periodic import run_periodic_eval
        results = run_periodic_eval(self.engine, self.cfg.eval, self.dist)
        self.metrics.log_eval(self.state.step, results)
        return results

    def save_checkpoint(self) -> str:
        """Save this step (once: a step saved already is not written again)."""
        tag = tag_for_step(self.state.step)
        if self.last_checkpoint is None or os.path.basename(self.last_checkpoint) != tag:
            self.last_checkpoint = self.checkpoints.save(self.engine, self.state,
                                                         to_dict(self.cfg))
        return self.last_checkpoint

    def maybe_resume(self) -> None:
        tag_dir = self.checkpoints.resolve(self.cfg.checkpoint.resume)
        if tag_dir is None:
            return
        self.state, _ = self.checkpoints.load(self.engine, tag_dir)
        self.last_checkpoint = tag_dir
        log.info(f"resumed from {tag_dir} at step {self.state.step} "
                 f"(epoch {self.state.epoch}, batch {self.state.batches_in_epoch})")

    def finish(self) -> None:
        """Final checkpoint, evaluation, export; done.json last (its presence means complete)."""
        cfg = self.cfg
        self.save_checkpoint()
        evaluated_now = cfg.eval.every_steps and self.state.step % cfg.eval.every_steps == 0
        if cfg.eval.at_end and (cfg.eval.val or cfg.eval.zeroshot) and not evaluated_now:
            self.evaluate()
        if cfg.checkpoint.export_at_end:
            self.export(os.path.join(cfg.run_dir, "export"))
        if self.dist.is_main:
            done = {"step": self.state.step, "samples_seen": self.state.samples_seen,
                    "checkpoint": self.last_checkpoint, "time": time.time()}
            tmp = os.path.join(cfg.run_dir, "done.json.tmp")
            with open(tmp, "w") as f:
                json.dump(done, f, indent=1)
            os.replace(tmp, os.path.join(cfg.run_dir, "done.json"))
        self.metrics.close()

    def export(self, out_dir: str) -> Optional[str]:
        """The student as an open_clip checkpoint, from the last checkpoint's files (rank 0)."""
        barrier()
        if not self.dist.is_main:
            return None
        return export_checkpoint(self.last_checkpoint, out_dir)
