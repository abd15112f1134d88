"""torchrun worker for tests/training/test_accumulation_bn.py: feature-cached accumulation with a
BatchNorm + dropout student (a timm test network with open_clip's MLP head, dropout 0.2).

For one optimizer step of 2 micro-batches of 4 per rank (real DeepSpeed engine, ZeRO-0, fp32):
- cached: the Trainer's own train_step; the gradient the optimizer receives (a step pre-hook),
  and the BatchNorm buffers after the step;
- reference: the same micro-batch partition without caching, on a copy of the task taken
  before the step: one train-mode forward per micro-batch from the same RNG state, the outputs
  joined, the full-batch loss backpropagated once, gradients (and, as the trainer does after
  each step, the BatchNorm running statistics) averaged over ranks;
- unreplayed: the Trainer's step with MicroBatchReplay switched off (the check must tell).
Writes OUT/rank<r>.json: relative gradient differences and buffer differences.
"""
from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist

from tests.helpers.torchrun import worker_args
from tests.helpers.trainer import TINY_DISTILL, optimizer_gradients, tiny_overrides
from training import accumulation
from training.accumulation import concat_outputs, running_stat_buffers
from training.config import load_config
from training.distributed import average_across_ranks
from training.files import write_json_atomic
from training.trainer import Trainer

STUDENT = {"embed_dim": 64,
           "vision_cfg": {"timm_model_name": "test_byobnet", "timm_model_pretrained": False,
                          "timm_pool": "avg", "timm_proj": "mlp", "timm_drop": 0.2,
                          "image_size": 64},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2,
                        "layers": 2}}


def named_grads(trainer: Trainer, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """The gradients the optimizer sees at the trainer's next step (ZeRO-0), by parameter name."""
    names = {id(p): n for n, p in trainer.task.named_parameters()}
    return {names[id(p)]: grad for p, grad in optimizer_gradients(trainer, micro_batches)}


def reference_grads(task, trainer: Trainer, micro_batches: list[dict]) -> dict:
    """One train-mode forward per micro-batch (no caching), one full-batch backward."""
    batches = [trainer.to_device(mb) for mb in micro_batches]
    teacher = trainer.teacher_outputs(batches)
    outputs = concat_outputs([task(mb["image"], mb["text"]) for mb in batches])
    trainer.loss_fn(outputs, teacher)["loss"].backward()
    grads = {}
    for name, param in task.named_parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            grads[name] = param.grad / dist.get_world_size()
    return grads


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a, (sorted(a)[:3], sorted(b)[:3])
    num = sum((a[k] - b[k]).pow(2).sum() for k in b).sqrt()
    return (num / sum(b[k].pow(2).sum() for k in b).sqrt()).item()


def buffer_difference(a: list, b: list) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def main() -> None:
    args, out, rank = worker_args("shards")
    student = out / "BN-Dropout-Student.json"
    write_json_atomic(student, STUDENT)  # every rank the same bytes, each write atomic
    results = {}
    for run in ("replayed", "unreplayed"):
        overrides = tiny_overrides(args.shards, out / run, steps=2, batch_size=4) + [
            f"model.student={student}", "optim.grad_accum_steps=2", "deepspeed.zero_stage=0",
            "optim.grad_clip=0", "loss.fixed_logit_scale=null", "loss.clip_weight=0.5",
            "checkpoint.export_at_end=false"]
        if run == "unreplayed":
            accumulation.MicroBatchReplay.randomness = lambda self, index: None
            accumulation.MicroBatchReplay.finish = lambda self: None
        trainer = Trainer(load_config(TINY_DISTILL, overrides))
        loader = iter(trainer.make_loader(epoch=0))
        micro_batches = [next(loader) for _ in range(2)]
        task = copy.deepcopy(trainer.task)
        rng = torch.get_rng_state()
        reference = reference_grads(task, trainer, micro_batches)
        average_across_ranks(running_stat_buffers(task))  # what the trainer does before a read
        torch.set_rng_state(rng)
        cached = named_grads(trainer, micro_batches)
        trainer.sync_running_stats()  # as before an evaluation or a checkpoint
        buffers = running_stat_buffers(trainer.task)
        results[run] = {
            "grad_vs_reference": relative_difference(cached, reference),
            "grad_norm": sum(g.pow(2).sum() for g in reference.values()).sqrt().item(),
            "tensors": len(reference), "bn_buffers": len(buffers),
            "buffers_vs_reference": buffer_difference(buffers, running_stat_buffers(task)),
            "batches_tracked": [int(b) for b in buffers if b.ndim == 0][:1],
            "buffer_checksum": sum(b.double().sum().item() for b in buffers
                                   if b.is_floating_point())}
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
