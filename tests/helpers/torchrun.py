"""Run a script under real torchrun (CPU, gloo) from a test, with a timeout and captured output.

Usage:
    from tests.helpers.torchrun import run_torchrun
    result = run_torchrun(["tests/training/dist_grad_worker.py", "--out", str(tmp_path)], nproc=2)
    result = run_torchrun(["-m", "training", "--config", cfg], nproc=2, timeout=400)

`args` are what follows torchrun's own options: a script path and its arguments, or
`-m module ...`. The ranks run `python -m torch.distributed.run --standalone` (a free port per call,
so tests can run side by side) with the CPU forced (no CUDA, DeepSpeed's CPU accelerator) and one
thread per rank. On a non-zero exit or a timeout it raises `TorchrunError` whose message ends with
the tail of the combined output, so a failing test shows the rank's traceback.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]

# What every rank gets unless the caller overrides it: CPU only, one thread, nothing online.
CPU_GLOO_ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def worker_args(*names: str) -> tuple[argparse.Namespace, Path, int]:
    """In a worker script run by run_torchrun: its required `--NAME` options plus `--out`, the
    output folder and this rank."""
    parser = argparse.ArgumentParser()
    for name in (*names, "out"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    return args, Path(args.out), int(os.environ["RANK"])


class TorchrunError(AssertionError):
    """torchrun exited non-zero or ran past its timeout; the message carries the output tail."""


def torchrun_command(args: list[str], nproc: int, nnodes: int = 1) -> list[str]:
    """The argv that launches `args` on `nproc` local ranks (single node, standalone rendezvous)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
        "--max_restarts=0",
        *[str(a) for a in args],
    ]


def torchrun_env(env: dict | None = None) -> dict:
    """os.environ + the CPU/gloo defaults + the repo on PYTHONPATH + the caller's `env` (wins)."""
    merged = dict(os.environ)
    merged.update(CPU_GLOO_ENV)
    python_path = [str(REPO_ROOT)] + [p for p in merged.get("PYTHONPATH", "").split(os.pathsep) if p]
    merged["PYTHONPATH"] = os.pathsep.join(python_path)
    merged.update({k: str(v) for k, v in (env or {}).items()})
    return merged


def run_torchrun(
    args: list[str],
    nproc: int,
    env: dict | None = None,
    timeout: int = 300,
    cwd: str | os.PathLike | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc_per_node nproc ARGS`; return the finished process.

    stdout and stderr are captured together in `result.stdout` (text). On timeout the agent and
    every rank are killed, so no orphan rank survives a hung test. `check=False` returns the
    result of a failed run instead of raising (for tests that expect a failure).
    """
    cmd = torchrun_command(args, nproc)
    proc = subprocess.Popen(
        cmd, cwd=str(cwd or REPO_ROOT), env=torchrun_env(env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        output, _ = proc.communicate()
        raise TorchrunError(f"torchrun timed out after {timeout}s: {' '.join(cmd)}\n"
                            f"{_tail(output)}") from None
    except BaseException:  # pytest-timeout, Ctrl-C: leave no rank behind
        kill_process_tree(proc.pid)
        raise
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout=output, stderr="")
    if check and proc.returncode != 0:
        raise TorchrunError(f"torchrun exited {proc.returncode}: {' '.join(cmd)}\n{_tail(output)}")
    return result


def run_worker(script: str, *args, timeout: int = 570) -> subprocess.CompletedProcess:
    """Run a worker script in one plain process (no torchrun) the way run_torchrun runs ranks:
    from the repo root, the CPU defaults and the repo on PYTHONPATH (a script's own folder, not
    the repo, is what Python puts on sys.path, and CI sets no PYTHONPATH), output captured. A
    non-zero exit or a timeout raises TorchrunError with the output's tail."""
    cmd = [sys.executable, str(script), *[str(a) for a in args]]
    try:
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=torchrun_env(), capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise TorchrunError(f"worker timed out after {timeout}s: {' '.join(cmd)}\n"
                            f"{_tail(str(err.stdout or '') + str(err.stderr or ''))}") from None
    if result.returncode != 0:
        raise TorchrunError(f"worker exited {result.returncode}: {' '.join(cmd)}\n"
                            f"{_tail(result.stdout + result.stderr)}")
    return result


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants. torchrun starts each rank in a session of its
    own, so killing the agent's process group would leave the ranks running."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _tail(text: str, max_chars: int = 6000) -> str:
    return text if len(text) <= max_chars else "...\n" + text[-max_chars:]


def start_worker(timeout_s: int = 60):
    """In a worker script started by run_torchrun with `--data DIR --out DIR`: parse them, join
    the process group and load DIR/inputs.pt. Returns (rank info, inputs, data dir, out dir)."""
    import argparse

    import torch

    from training.distributed import init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    info = init_distributed(timeout_s=timeout_s)
    inputs = torch.load(Path(args.data) / "inputs.pt", weights_only=False)
    return info, inputs, Path(args.data), Path(args.out)
