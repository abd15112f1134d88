"""torchrun worker for tests/training/test_zero_stages.py (one launch, several checks).

1. For ZeRO 0/1/2/3 in fp32 (and ZeRO-2 in bf16): a Trainer of configs/tiny-distill.yaml runs a
   few steps with gradient clipping and exports; we record the loss of one fixed batch before and
   after, and the trained model's outputs on a probe batch on every rank.
2. Gradient accumulation: the gradient the optimizer receives for one step of 2 micro-batches of
   4 (feature-cached) vs one batch of 8 vs a naive accumulation (each micro-batch's own loss),
   at ZeRO 0 and 2, captured by an optimizer step pre-hook.
Each rank writes OUT/rank<r>.json and OUT/probe-<run>-rank<r>.pt; the test asserts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers.torchrun import worker_args
from tests.helpers.trainer import TINY_DISTILL, optimizer_gradients, probe_batch, tiny_overrides
from training import models
from training.config import load_config
from training.trainer import Trainer

STEPS = 5
RUNS = {"zero0": ["deepspeed.zero_stage=0"], "zero1": ["deepspeed.zero_stage=1"],
        "zero2": ["deepspeed.zero_stage=2"], "zero3": ["deepspeed.zero_stage=3"],
        "zero2-bf16": ["deepspeed.zero_stage=2", "deepspeed.precision=bf16"]}


@torch.no_grad()
def fixed_batch_loss(trainer: Trainer, batch: dict) -> float:
    student = trainer.student_outputs(batch)
    return trainer.loss_fn(student, trainer.teacher_outputs([batch]))["loss"].item()


def train_run(name: str, extra: list[str], shards: str, out: Path, rank: int) -> dict:
    overrides = tiny_overrides(shards, out / name, steps=STEPS) + [
        "optim.grad_clip=1.0", "optim.lr=1e-4"] + extra
    trainer = Trainer(load_config(TINY_DISTILL, overrides))
    batch = next(iter(trainer.make_loader(epoch=0)))
    before = fixed_batch_loss(trainer, batch)
    finished = trainer.train()
    after = fixed_batch_loss(trainer, batch)
    images, texts = probe_batch()
    with torch.no_grad():
        probe = models.encode(trainer.engine, images, texts)
    torch.save({k: v.float() for k, v in probe.items()}, out / f"probe-{name}-rank{rank}.pt")
    return {"before": before, "after": after, "finished": finished}


class NaiveAccumulationTrainer(Trainer):
    """What accumulation without feature caching does: each micro-batch's own loss."""

    def train_step(self, micro_batches):
        for micro_batch in micro_batches:
            losses = self.loss_fn(self.student_outputs(micro_batch),
                                  self.teacher_outputs([micro_batch]))
            self.engine.backward(losses["loss"])  # DeepSpeed divides by the accumulation steps
            self.engine.step()
        return {}


def captured_gradient(trainer: Trainer, micro_batches: list[dict]) -> list:
    """The gradients the optimizer sees at the trainer's next step."""
    return [grad for _, grad in optimizer_gradients(trainer, micro_batches)]


def relative_difference(a: list, b: list) -> float:
    assert len(a) == len(b) and a, (len(a), len(b))
    num = sum((x - y).pow(2).sum() for x, y in zip(a, b)).sqrt()
    den = sum(y.pow(2).sum() for y in b).sqrt()
    return (num / den).item()


def accumulation_run(stage: int, shards: str, out: Path) -> dict:
    common = tiny_overrides(shards, out / f"accum{stage}", steps=3) + [
        f"deepspeed.zero_stage={stage}", "optim.grad_clip=0", "loss.fixed_logit_scale=null",
        "loss.clip_weight=0.5", "checkpoint.export_at_end=false"]
    full = common + ["data.batch_size=8", "optim.grad_accum_steps=1"]
    split = common + ["data.batch_size=4", "optim.grad_accum_steps=2"]
    full_batch_trainer = Trainer(load_config(TINY_DISTILL, full))
    batch = next(iter(full_batch_trainer.make_loader(epoch=0)))
    halves = [{k: (v[i * 4:(i + 1) * 4] if isinstance(v, (torch.Tensor, list)) else v)
               for k, v in batch.items()}
              for i in range(2)]
    reference = captured_gradient(full_batch_trainer, [batch])
    cached = captured_gradient(Trainer(load_config(TINY_DISTILL, split)), halves)
    naive = captured_gradient(NaiveAccumulationTrainer(load_config(TINY_DISTILL, split)), halves)
    return {"cached_vs_full": relative_difference(cached, reference),
            "naive_vs_full": relative_difference(naive, reference),
            "grad_norm": sum(g.pow(2).sum() for g in reference).sqrt().item(),
            "tensors": len(reference)}


def main() -> None:
    args, out, rank = worker_args("shards")
    results = {"runs": {name: train_run(name, extra, args.shards, out, rank)
                        for name, extra in RUNS.items()},
               "accumulation": {f"zero{stage}": accumulation_run(stage, args.shards, out)
                                for stage in (0, 2)}}
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
