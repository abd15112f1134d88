"""A small real distributed program that honours the trainer's launch contract.

It lets the launch tests exercise the job script (signals, requeue, resume, crash) in seconds,
independent of the real trainer: same command line (`--config FILE run_dir=DIR key=value ...`),
same run directory (metrics.jsonl, checkpoints/<tag>/ + checkpoints/latest, done.json), same
behaviour on SIGUSR1/SIGTERM (finish the step, all ranks agree, checkpoint, exit 0 without
done.json). Every step all-reduces over gloo, so a lost rank is noticed by the others.

Keys: run_dir, total_steps (10), step_s (seconds per step, 0.3), checkpoint.resume (latest).
The "loss" of step s is a fixed function of s, so a resumed run's metrics are predictable.
"""
import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

STOP = {"requested": False}


def loss_at(step: int) -> float:
    return round(1.0 / (1 + step), 6)


def parse(argv: list[str]) -> dict:
    options = {"total_steps": "10", "step_s": "0.3", "checkpoint.resume": None}
    args = iter(argv)
    for item in args:
        if item == "--config":
            next(args)
        else:
            key, _, value = item.partition("=")
            options[key] = value
    return options


def main() -> int:
    opts = parse(sys.argv[1:])
    # Like the trainer: handlers while training, the previous ones (SIG_IGN under
    # launch.torchrun) restored before exit, so a late repeat of the signal cannot kill us.
    previous = {sig: signal.signal(sig, lambda *_: STOP.update(requested=True))
                for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return train(opts)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(opts: dict) -> int:
    run_dir, total, step_s = opts["run_dir"], int(opts["total_steps"]), float(opts["step_s"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    step = 0
    if opts["checkpoint.resume"] == "latest":
        with open(latest) as f:
            tag = f.read().strip()
        with open(os.path.join(run_dir, "checkpoints", tag, "state.json")) as f:
            step = json.load(f)["step"]
    print(f"rank {rank} of {dist.get_world_size()} host {os.uname().nodename} "
          f"node {os.environ.get('SLURM_NODEID', '-')} starts at step {step}", flush=True)
    while step < total:
        time.sleep(step_s)
        value = torch.tensor([float(step)])
        dist.all_reduce(value)
        step += 1
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_at(step),
                                    "world": dist.get_world_size()}) + "\n")
        print(f"rank {rank} step {step}", flush=True)
        stop = torch.tensor([1.0 if STOP["requested"] else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # all ranks agree to stop after this step
        if stop.item() > 0 and step < total:
            save(run_dir, step, rank)
            print(f"rank {rank} stopped at step {step} after a signal", flush=True)
            dist.destroy_process_group()
            return 0
    save(run_dir, step, rank)
    if rank == 0:
        with open(os.path.join(run_dir, "done.json"), "w") as f:
            json.dump({"step": step}, f)
    dist.destroy_process_group()
    return 0


def save(run_dir: str, step: int, rank: int) -> None:
    if rank == 0:
        tag = f"step_{step:08d}"
        os.makedirs(os.path.join(run_dir, "checkpoints", tag), exist_ok=True)
        with open(os.path.join(run_dir, "checkpoints", tag, "state.json"), "w") as f:
            json.dump({"step": step}, f)
        tmp = os.path.join(run_dir, "checkpoints", "latest.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(run_dir, "checkpoints", "latest"))
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
