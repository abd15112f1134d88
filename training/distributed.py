"""Who am I in the job, how the process group starts, and the two collectives the loop needs.

Rank information comes from, in this order:
1. torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK;
2. SLURM, when the process is a task of an `srun` step: SLURM_PROCID, SLURM_STEP_NUM_TASKS (or
   SLURM_NTASKS), SLURM_LOCALID, SLURM_NODEID, MASTER_ADDR = the first host of the node list,
   MASTER_PORT derived from the job id (so every task of the job agrees without talking);
3. nothing: a plain single process (world 1) on 127.0.0.1 and a free port.
The launcher variables DeepSpeed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
are filled in where missing, because without them `deepspeed.init_distributed` falls back to MPI
discovery and fails (no mpi4py). Variables already set are never overwritten.
"""
from __future__ import annotations

import os
import re
import socket
import warnings
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# torch.distributed.nn.functional.all_gather is the public autograd all-gather that works on gloo
# and NCCL alike (OpenCLIP uses it); torch 2.14 marks it deprecated in favour of a private module.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
    category=FutureWarning)

SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000
SLURM_SPECIAL_STEP_IDS = 0xFFFFFFF0  # batch, extern, interactive steps have ids from here up


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. `device` is "cuda:<local_rank>" on NCCL, else "cpu"."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    backend: str
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(backend: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if backend == "nccl" else "cpu"


def rank_info_from_env(env: MutableMapping[str, str] | None = None,
                       backend: str | None = None) -> DistInfo:
    """Read this process's rank information and fill in the launcher variables DeepSpeed needs.

    `env` defaults to os.environ (and is then updated in place); tests pass a dict.
    """
    env = os.environ if env is None else env
    backend = backend or default_backend()
    if "RANK" in env and "WORLD_SIZE" in env:
        info = _from_torchrun(env, backend)
    elif "SLURM_PROCID" in env and is_srun_step(env):
        info = _from_slurm(env, backend)
    else:
        info = DistInfo(0, 1, 0, 1, 0, backend, device_for(backend, 0))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size),
                       ("LOCAL_RANK", info.local_rank),
                       ("LOCAL_WORLD_SIZE", info.local_world_size)):
        env.setdefault(key, str(value))
    return info


def is_srun_step(env: MutableMapping[str, str]) -> bool:
    """True inside a task of an `srun` step; False in the batch shell or an salloc shell, whose
    SLURM_NTASKS describes the allocation, not processes that exist (those would wait forever)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return step.isdigit() and int(step) < SLURM_SPECIAL_STEP_IDS


def _from_torchrun(env: MutableMapping[str, str], backend: str) -> DistInfo:
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    # torchrun: LOCAL_WORLD_SIZE / GROUP_RANK; the deepspeed launcher: LOCAL_SIZE / CROSS_RANK.
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world_size)))
    default_node = rank // max(1, local_world_size)
    node_rank = int(env.get("GROUP_RANK", env.get("CROSS_RANK", env.get("NODE_RANK", default_node))))
    return DistInfo(rank, world_size, local_rank, local_world_size, node_rank, backend,
                    device_for(backend, local_rank))


def _from_slurm(env: MutableMapping[str, str], backend: str) -> DistInfo:
    rank = int(env["SLURM_PROCID"])
    world_size = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
    local_rank = int(env.get("SLURM_LOCALID", 0))
    node_rank = int(env.get("SLURM_NODEID", 0))
    tasks_per_node = expand_tasks_per_node(
        env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", str(world_size))))
    local_world_size = tasks_per_node[min(node_rank, len(tasks_per_node) - 1)]
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", ""))
        env["MASTER_ADDR"] = first_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in env:
        job_id = int(env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", 0)))
        env["MASTER_PORT"] = str(SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN)
    return DistInfo(rank, world_size, local_rank, local_world_size, node_rank, backend,
                    device_for(backend, local_rank))


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[003-010,12],login1" -> "gpu003", "n1,n2" -> "n1".

    Hand-written because `scontrol show hostnames` is not always on the compute nodes' PATH and
    only the first host is needed (the rendezvous host), which keeps zero padding intact.
    """
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if not ranges:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + suffix


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed tasks-per-node string: "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"cannot read SLURM tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: int = 120) -> DistInfo:
    """Start the process group through DeepSpeed (so its comm layer is set up too); idempotent.

    On CPU, DeepSpeed would JIT-compile its shared-memory comm op at first init (30-70 s): that
    op is switched off, gloo does the work.
    """
    info = rank_info_from_env(backend=backend)
    if info.backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if dist.is_available() and dist.is_initialized():
        return info
    import deepspeed  # imported here: it is slow to import and not needed for rank arithmetic

    if info.backend != "nccl":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=info.backend, timeout=timedelta(seconds=timeout_s),
                               auto_mpi_discovery=False, verbose=False)
    return info


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over ranks in rank order; the gradient flows back to each rank's own rows.

    The backward pass sums, over ranks, the gradients that reach this rank's rows, so a per-rank
    loss on local rows x gathered columns, summed over ranks, differentiates like the full batch.
    All ranks must pass the same shape. Identity in a single process.
    """
    if not is_distributed():
        return x
    return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


@torch.no_grad()
def average_across_ranks(tensors: list[torch.Tensor]) -> None:
    """In place: each floating-point tensor becomes its mean over the ranks (one all-reduce of
    them all, flattened). Integer tensors (counters every rank advances alike) are left as they
    are. No-op in a single process."""
    tensors = [t for t in tensors if t.is_floating_point()]
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for tensor, mean in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(mean.view_as(tensor))


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank if it is True on any rank (e.g. "a preemption signal arrived")."""
    if not is_distributed():
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()

