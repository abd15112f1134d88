"""The DeepSpeed engine, built from our config.

`deepspeed_config` is the whole translation from `TrainConfig` to DeepSpeed's JSON: ZeRO stage,
precision, clipping, micro-batch and accumulation sizes. The optimizer and the LR schedule are
ours (training/optim.py) and go in as client objects, so the same code runs on CPU (gloo,
fp32/bf16) and GPU (NCCL, bf16/fp16) with no compiled DeepSpeed op.
"""
from __future__ import annotations

from training.config import TrainConfig
from training.optim import build_optimizer, build_scheduler


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

    if cfg.model.grad_checkpointing:
        task.set_grad_checkpointing(True)
    optimizer = build_optimizer(task, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=task, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, load_universal), dist_init_required=False)
    return engine, scheduler
