"""training.distributed: rank information from each launcher, and the distributed loss's gradients.

The slow test runs tests/training/dist_grad_worker.py under real torchrun (2 ranks, gloo) with real
DeepSpeed engines: each rank holds half the batch, DeepSpeed averages the gradients over ranks, and
the result must equal one process's gradients on the full batch.
"""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.torchrun import TorchrunError, run_torchrun
from training.distributed import (all_reduce_flag, expand_tasks_per_node, first_host, gather_with_grad,
                                  rank_info_from_env)
from training.objectives import DistillationLoss
from training.models import encode
from training.specs import build_student, build_teacher

# ------------------------------------------------------------------ rank information (no processes)


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    info = rank_info_from_env(env, backend="gloo")
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (5, 8, 1, 4, 1)
    assert (info.backend, info.device, info.is_main, info.num_nodes) == ("gloo", "cpu", False, 2)
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"


def test_nccl_device_is_the_local_gpu():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}
    assert rank_info_from_env(env, backend="nccl").device == "cuda:3"


def test_deepspeed_launcher_variables():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
           "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    info = rank_info_from_env(env, backend="gloo")
    assert (info.local_world_size, info.node_rank) == (2, 1)


def test_slurm_variables_fill_in_what_deepspeed_needs():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    info = rank_info_from_env(env, backend="gloo")
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (3, 4, 1, 2, 1)
    assert env["MASTER_ADDR"] == "gpu007"
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")


@pytest.mark.parametrize("step", [None, "4294967294"])  # no step, or the batch step's id
def test_slurm_batch_shell_without_srun_is_a_single_process(step):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}
    if step is not None:
        env["SLURM_STEP_ID"] = step
    info = rank_info_from_env(env, backend="gloo")
    assert info.world_size == 1 and env["WORLD_SIZE"] == "1"


def test_torchrun_inside_srun_wins_over_slurm():
    env = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "RANK": "3", "WORLD_SIZE": "4",
           "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    assert rank_info_from_env(env, backend="gloo").rank == 3


def test_single_process_sets_launcher_variables_and_keeps_existing_ones():
    env = {}
    info = rank_info_from_env(env, backend="gloo")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("0", "1", "0")
    env = {"MASTER_PORT": "4242"}
    rank_info_from_env(env, backend="gloo")
    assert env["MASTER_PORT"] == "4242"


@pytest.mark.parametrize("nodelist, first", [("n1,n2", "n1"), ("gpu[003-010,12],login1", "gpu003"),
                                             ("node17", "node17"), ("rack1-[2,5]-ib", "rack1-2-ib")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_tasks_per_node_expansion():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="tasks per node"):
        expand_tasks_per_node("two")


def test_collectives_are_identities_in_a_single_process():
    x = torch.ones(3, requires_grad=True)
    assert gather_with_grad(x) is x
    assert all_reduce_flag(True) is True and all_reduce_flag(False) is False


# ------------------------------------------------------------------ 2 ranks under torchrun

LOSS_CASES = {
    # learned student scale, the teacher's own scale, all three terms
    "distill_learned": {"teacher": True, "loss": {"affinity_weight": 1.0, "clip_weight": 0.5,
                                                   "feature_weight": 1.0}},
    # TinyCLIP's released recipe: affinity only, both scales fixed to 50
    "distill_fixed50": {"teacher": True, "loss": {"affinity_weight": 1.0, "fixed_logit_scale": 50.0}},
    # plain CLIP pretraining: no teacher
    "clip": {"teacher": False, "loss": {"affinity_weight": 0.0, "clip_weight": 1.0}},
}
BATCH, WORLD = 8, 2


def write_inputs(folder):
    """The full batch, the teacher's outputs, the student's initial weights; returns the student."""
    torch.manual_seed(0)
    student, info = build_student("Tiny-ViT-Student")
    teacher, _ = build_teacher("Tiny-ViT-Teacher")
    images = torch.randn(BATCH, 3, 64, 64)
    texts = info.tokenizer([f"a photo of shape number {i}" for i in range(BATCH)])
    with torch.no_grad():
        teacher_out = encode(teacher, images, texts)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(folder / "student.safetensors"))
    torch.save({"model": "Tiny-ViT-Student", "images": images, "texts": texts, "teacher": teacher_out,
                "cases": LOSS_CASES, "shapes": {n: p.shape for n, p in student.named_parameters()}},
               folder / "inputs.pt")
    return student, images, texts, teacher_out


def full_batch_reference(student, images, texts, teacher_out, case):
    student.zero_grad(set_to_none=True)
    out = DistillationLoss(**case["loss"])(encode(student, images, texts),
                                           teacher_out if case["teacher"] else None)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_two_ranks_give_the_full_batch_gradient(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir(), out.mkdir()
    student, images, texts, teacher_out = write_inputs(data)
    run_torchrun(["tests/training/dist_grad_worker.py", "--data", str(data), "--out", str(out)],
                 nproc=WORLD, timeout=300)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for r, record in enumerate(ranks):
        assert record["info"]["rank"] == record["info"]["dist_rank"] == r
        assert record["info"]["world_size"] == record["info"]["dist_world"] == WORLD
        assert torch.equal(record["gathered"][:, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
        assert torch.equal(record["gather_grad"][:, 0], WORLD * torch.tensor([2.0 * r, 2.0 * r + 1]))
        assert record["flag_one_rank"] is True and record["flag_none"] is False

    for name, case in LOSS_CASES.items():
        loss, grads = full_batch_reference(student, images, texts, teacher_out, case)
        # The full-batch loss is the mean of the per-rank (local-row) losses ...
        rank_losses = torch.stack([record["cases"][name]["loss"] for record in ranks])
        assert torch.allclose(rank_losses.mean(), loss, atol=1e-5), name
        # ... so DeepSpeed's rank-averaged gradients are the full-batch gradients, on every rank.
        for record in ranks:
            dist_grads = record["cases"][name]["grads"]
            assert set(dist_grads) == set(grads), name
            for param, grad in grads.items():
                assert torch.allclose(dist_grads[param], grad, atol=1e-5, rtol=1e-4), (name, param)
        assert grads["visual.conv1.weight"].abs().sum() > 0 and grads["text_projection"].abs().sum() > 0


# ------------------------------------------------------------------ the torchrun helper itself

FAILING_SCRIPT = """
import os, sys, time
from pathlib import Path
rank = int(os.environ["RANK"])
Path(sys.argv[1], f"pid{rank}").write_text(str(os.getpid()))
if sys.argv[2] == "hang":
    time.sleep(120)
if rank == 1:
    raise SystemExit("rank 1 gives up: " + os.environ["CUDA_VISIBLE_DEVICES"] + "|" + os.environ["DS_ACCELERATOR"])
"""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is dead too


@pytest.mark.slow
def test_torchrun_helper_reports_a_failing_rank_and_kills_a_hung_run(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(FAILING_SCRIPT)
    with pytest.raises(TorchrunError, match=r"exited 1(.|\n)*rank 1 gives up: \|cpu"):
        run_torchrun([str(script), str(tmp_path), "fail"], nproc=2, timeout=120)

    with pytest.raises(TorchrunError, match="timed out after 20s"):
        run_torchrun([str(script), str(tmp_path), "hang"], nproc=2, timeout=20)
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    assert not any(pid_alive(pid) for pid in pids)
