"""Worker for test_token_engines.py, run under torchrun with 2 ranks (gloo, CPU).

Usage: token_engines_worker.py DATA OUT. Reads DATA/inputs.pt (the full batch, the teacher's token-level outputs, the block pairs) and
DATA/task.safetensors (the task module's initial weights: the student and its alignment head),
takes this rank's half of the batch and, per case, builds a real DeepSpeed engine around the
task module (which captures the token-level outputs in its forward), runs forward, the case's
terms and engine.backward (which averages gradients over ranks). Saves to OUT/rank{R}.pt the
loss, the full gradients (ZeRO-3: gathered with deepspeed.utils.safe_get_full_grad) and the
forward's outputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist

from training import models
from training.distributed import init_distributed
from training.objectives.attribution import AttributionTerm
from training.objectives.base import TermInputs
from training.objectives.intermediate import BlockAlignment, IntermediateTerm, parse_pairs
from training.task import DistillationTask

models.register_model_configs()

# case -> (the terms summed, ZeRO stage)
CASES = {"attribution": (("attribution",), 0), "intermediate": (("intermediate",), 0),
         "both-zero3": (("attribution", "intermediate"), 3)}


def build_task(inputs: dict, state_file: str | None = None) -> DistillationTask:
    """The student with the alignment head and the patch-token capture, made DeepSpeed-safe,
    from the saved weights (or from a fixed seed when there are none yet)."""
    torch.manual_seed(0)
    student = open_clip.create_model(inputs["student"], output_dict=True)
    teacher_layout = open_clip.create_model(inputs["teacher_model"], output_dict=True)
    head = BlockAlignment.for_models(parse_pairs(inputs["pairs"]), student, teacher_layout)
    task = models.make_deepspeed_safe(DistillationTask(student, {"intermediate": head},
                                                       token_outputs=["image_patch_tokens"]))
    if state_file is not None:
        models.load_strict(task, models.load_state_dict_file(state_file), "task weights")
    return task


def terms_loss(names: tuple[str, ...], inputs: dict, student: dict, teacher: dict
               ) -> torch.Tensor:
    """The sum of the terms `names` on these rows (attribution over all ranks' captions)."""
    terms = {"attribution": AttributionTerm(kind="kl", temperature=0.1, captions="all"),
             "intermediate": IntermediateTerm(inputs["pairs"], kind="mse")}
    ids = torch.arange(student["image_features"].shape[0])
    term_inputs = TermInputs(student=student, teacher=teacher, local_ids=ids, global_ids=ids)
    return sum(terms[name](term_inputs) for name in names)


def run_case(case: str, inputs: dict, state_file: str, rank: int, world: int) -> dict:
    import deepspeed  # here, so that the test importing build_task / case_loss stays light
    from deepspeed.utils import safe_get_full_grad

    task = build_task(inputs, state_file)
    local = inputs["images"].shape[0] // world
    rows = slice(rank * local, (rank + 1) * local)
    config = {"train_batch_size": local * world, "train_micro_batch_size_per_gpu": local,
              "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": CASES[case][1]}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=task, config=config,
                                      optimizer=torch.optim.AdamW(task.parameters(), lr=1e-3))
    outputs = engine(inputs["images"][rows], inputs["texts"][rows])
    teacher = {k: v[rows] if v.ndim else v for k, v in inputs["teacher"].items()}
    loss = terms_loss(CASES[case][0], inputs, outputs, teacher)
    engine.backward(loss)
    grads = {}
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param) if CASES[case][1] == 3 else param.grad
        if grad is not None:
            grads[name] = grad.detach().clone().reshape(inputs["shapes"][name])
    engine.step()
    return {"loss": loss.detach(), "grads": grads,
            "outputs": {k: v.detach().clone() for k, v in outputs.items()}}


def main(data: Path, out: Path) -> None:
    info = init_distributed(timeout_s=60)
    inputs = torch.load(data / "inputs.pt", weights_only=False)  # written by the test
    record = {case: run_case(case, inputs, str(data / "task.safetensors"), info.rank,
                             info.world_size) for case in CASES}
    torch.save(record, out / f"rank{info.rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))  # DATA OUT
