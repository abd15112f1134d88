"""Worker for test_distributed_grad.py, run under torchrun with 2 ranks (gloo, CPU).

Reads DATA/inputs.pt (the full batch, the teacher's outputs, the loss cases) and DATA/student.safetensors
(the student's initial weights), takes this rank's half of the batch, and for each loss case builds a
real DeepSpeed engine (ZeRO-0, fp32, gradient clipping), runs forward, the distributed loss and
engine.backward (which averages gradients over ranks), and saves the gradients to OUT/rank{R}.pt.
It also records what the collectives return, for the test to check.
"""
import deepspeed
import torch
import torch.distributed as dist

from tests.helpers.torchrun import start_worker
from training.distributed import all_reduce_flag, gather_with_grad
from training.objectives import DistillationLoss
from training.models import encode, make_deepspeed_safe
from training.specs import build_student


def collectives_record(rank: int, world: int) -> dict:
    x = torch.full((2, 3), float(rank), requires_grad=True)
    gathered = gather_with_grad(x)
    weights = torch.arange(2.0 * world).reshape(-1, 1)
    (gathered * weights).sum().backward()  # every rank the same sum: each row's grad is world * weight
    return {"gathered": gathered.detach(), "gather_grad": x.grad,
            "flag_one_rank": all_reduce_flag(rank == world - 1), "flag_none": all_reduce_flag(False)}


def run_case(case: dict, inputs: dict, student_file: str, rank: int, world: int) -> dict:
    model, _ = build_student(inputs["model"], init_state_dict=student_file)
    make_deepspeed_safe(model)
    local = inputs["images"].shape[0] // world
    rows = slice(rank * local, (rank + 1) * local)
    config = {"train_batch_size": local * world, "train_micro_batch_size_per_gpu": local,
              "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    student = encode(engine, inputs["images"][rows], inputs["texts"][rows])
    teacher = None if case["teacher"] is False else {k: v[rows] if v.ndim else v
                                                     for k, v in inputs["teacher"].items()}
    out = DistillationLoss(**case["loss"])(student, teacher)
    engine.backward(out["loss"])
    grads = {n: p.grad.detach().clone().reshape(inputs["shapes"][n])
             for n, p in engine.module.named_parameters() if p.grad is not None}
    engine.step()  # ZeRO-0 + clipping on the [1]-shaped logit_scale must work
    return {"loss": out["loss"].detach(), "grads": grads}


def main():
    info, inputs, data, out = start_worker()
    record = {"info": vars(info) | {"dist_rank": dist.get_rank(), "dist_world": dist.get_world_size()},
              **collectives_record(info.rank, info.world_size)}
    record["cases"] = {name: run_case(case, inputs, str(data / "student.safetensors"),
                                      info.rank, info.world_size)
                       for name, case in inputs["cases"].items()}
    torch.save(record, out / f"rank{info.rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
