"""The DeepSpeed engine, built from our config.

`deepspeed_config` is the whole translation from `TrainConfig` to DeepSpeed's JSON: ZeRO stage,
precision, clipping, micro-batch and accumulation sizes. The optimizer and the LR schedule are
ours (training/optim.py) and go in as client objects, so the same code runs on CPU (gloo,
fp32/bf16) and GPU (NCCL, bf16/fp16) with no compiled DeepSpeed op.
"""
from __future__ import annotations

import logging

from training.config import TrainConfig
from training.optim import build_optimizer, build_scheduler

log = logging.getLogger("training")


def deepspeed_config(cfg: TrainConfig, world_size: int, load_universal: bool = False) -> dict:
    """DeepSpeed's config dict for this run (also written into the run dir for reference).
    `load_universal`: the checkpoint to resume is in DeepSpeed's universal form (another world
    size at ZeRO 1-3, training/checkpoint.py)."""
    ds, optim = cfg.deepspeed, cfg.optim
    micro = cfg.data.batch_size
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": optim.grad_accum_steps,
        "train_batch_size": micro * optim.grad_accum_steps * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2},
        # torch AdamW is "untested" for ZeRO in DeepSpeed's eyes; it works at every stage.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our metrics.py logs; keep DeepSpeed's own log quiet
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    return config


def build_engine(task, cfg: TrainConfig, *, total_steps: int, world_size: int,
                 load_universal: bool = False):
    """deepspeed.initialize over the task module (training/task.py) with its AdamW groups and
    our warm-up/cosine schedule.

    Returns (engine, scheduler). The engine steps the scheduler at each optimizer step and saves
    its state in checkpoints.
    """
    import deepspeed

    if world_size == 1 and cfg.deepspeed.zero_stage > 0:
        # Not lowered automatically: the stage is a resume invariant, and a ZeRO 1-3 checkpoint
        # can resume on more ranks (universal form), a ZeRO-0 one cannot.
        log.info(f"one process at ZeRO-{cfg.deepspeed.zero_stage}: nothing to partition, the "
                 f"stage only adds gradient copies (~20% of a tiny CPU step, docs/benchmarks.md); "
                 f"deepspeed.zero_stage=0 is faster unless this run is to resume on more ranks")
    if cfg.model.grad_checkpointing:
        task.set_grad_checkpointing(True)
    optimizer = build_optimizer(task, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=task, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, load_universal), dist_init_required=False)
    if world_size == 1 and cfg.deepspeed.zero_stage == 0:
        # Its gradient all-reduce over one rank is the identity, but DeepSpeed still flattens
        # every gradient into a bucket, reduces it and copies it back (~3% of a tiny CPU step).
        engine.enable_backward_allreduce = False
    return engine, scheduler
