"""torchrun worker for tests/students (one launch, several checks): the tiny KDEOV recipe
(configs/kdeov-tiny.yaml: a LiT student with the teacher's frozen text tower, a CSPDarknet
vision tower with BatchNorm, a FiLM fusion head, the heads in their own learning-rate group), 4
steps of 2 feature-cached micro-batches at ZeRO-2, on 2 ranks:

- "full": uninterrupted, evaluated at the end (zero-shot + retrieval) and exported; the calls of
  the student's and the teacher's text transformers during the training steps are counted;
- "resumed": the same run preempted (SIGUSR1) after step 2, then resumed from its checkpoint;
- "zero3": the same recipe at ZeRO-3 (frozen parameters partitioned too), 2 steps, exported.
Each rank writes OUT/rank<r>.json; the tests read those and the run folders.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from tests.helpers.torchrun import worker_args
from tests.helpers.trainer import tiny_overrides
from training.config import load_config
from training.optim import named_param_groups
from training.trainer import Trainer

RECIPE = str(Path(__file__).resolve().parents[2] / "configs" / "kdeov-tiny.yaml")
STEPS = 4


class CountingTrainer(Trainer):
    """Counts the forward calls of the student's and the teacher's text transformers while it
    trains (the hooks go before the end-of-run evaluation, which runs the student's)."""

    def train(self) -> bool:
        self.calls = {"student": 0, "teacher": 0}
        towers = {"student": self.task.student.transformer,
                  "teacher": self.teacher.model.transformer}
        self.hooks = [tower.register_forward_hook(
            lambda *_, who=who: self.calls.__setitem__(who, self.calls[who] + 1))
            for who, tower in towers.items()]
        return super().train()

    def finish(self) -> None:
        for hook in self.hooks:
            hook.remove()
        super().finish()


class PreemptedTrainer(Trainer):
    """Sends itself SIGUSR1 after step `stop_at`: the real preemption path (checkpoint, exit)."""
    stop_at = 2

    def after_step(self, values, data_wait_s) -> None:
        super().after_step(values, data_wait_s)
        if self.train_state.step == self.stop_at:
            os.kill(os.getpid(), signal.SIGUSR1)


def overrides(args, run: str, steps: int = STEPS) -> list[str]:
    return tiny_overrides(args.shards, Path(args.out) / run, steps=steps, batch_size=4) + [
        f"model.teacher_pretrained={args.teacher}", "optim.grad_accum_steps=2",
        "deepspeed.zero_stage=2", "checkpoint.every_steps=2", "checkpoint.resume=latest",
        "optim.warmup_steps=1", "optim.min_lr=1e-5", "optim.lr=1e-3"]  # the recipe's rates


def main() -> None:
    args, out, rank = worker_args("shards", "zeroshot", "val", "teacher")
    results = {}

    full = CountingTrainer(load_config(RECIPE, overrides(args, "full") + [
        f"eval.zeroshot={args.zeroshot}", f"eval.val={args.val}", "eval.batch_size=16"]))
    results["full"] = {"finished": full.train(), "text_calls": full.calls,
                       "groups": [{"name": g["name"], "lr": g["lr"], "initial_lr": g["initial_lr"]}
                                  for g in full.scheduler.optimizer.param_groups],
                       "named": named_param_groups(full.task, full.cfg.optim)}
    student = full.task.student
    teacher = full.teacher.model.state_dict()
    text = [k for k in student.state_dict() if k.startswith(("transformer.", "token_embedding",
                                                              "ln_final", "text_projection"))]
    results["full"]["text_equals_teacher"] = all(
        torch.equal(student.state_dict()[k], teacher[k]) for k in text)
    results["full"]["text_tensors"] = len(text)
    results["full"]["frozen"] = sorted({n.split(".")[0] for n, p in student.named_parameters()
                                        if not p.requires_grad})

    preempted = PreemptedTrainer(load_config(RECIPE, overrides(args, "resumed")))
    results["resumed"] = {"first": preempted.train()}
    resumed = Trainer(load_config(RECIPE, overrides(args, "resumed")))
    results["resumed"].update(restored_step=resumed.train_state.step, second=resumed.train())

    zero3 = Trainer(load_config(RECIPE, overrides(args, "zero3", steps=2) + [
        "deepspeed.zero_stage=3"]))
    results["zero3"] = {"finished": zero3.train()}
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
