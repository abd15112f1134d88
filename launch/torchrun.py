"""Build (and run) the torchrun command for one node or for N nodes.

One node: `torchrun --standalone` (a free port, nothing to configure). N nodes: every node runs
the same command with the c10d rendezvous on MASTER_ADDR:MASTER_PORT and a shared run id; the
rendezvous hands out node ranks, so no node needs to know its own. The SLURM job script calls
this module on every node (`srun python -m launch.torchrun ...`), so the torchrun flags live in
one place for both paths.

    python -m launch.torchrun --nproc-per-node 8 -- --config configs/tiny-distill.yaml
    python -m launch.torchrun --nnodes 2 --master-addr node0 --master-port 29500 --run-id exp1 \
        -- --config configs/tiny-distill.yaml          # the same on both nodes

Settings not given as arguments come from the environment (NNODES / SLURM_NNODES, MASTER_ADDR,
MASTER_PORT, RUN_ID / SLURM_JOB_ID, NPROC_PER_NODE). This module does not import torch: it runs
on a login node and in the job script before any rank starts.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
from dataclasses import dataclass

# SIGUSR1 is the preemption warning. It goes to the ranks only (SLURM signals every process of
# the job step; on a plain machine send it to the rank processes): the torchrun agent ignores it
# (see `ignore_preemption_signal`), waits for its ranks to checkpoint and exit 0, and then exits 0
# itself through its normal exit barrier, so no node is torn down while another still saves.
PREEMPTION_SIGNAL = signal.SIGUSR1
# Seconds the agent waits for its ranks to exit after a SIGTERM before it sends SIGKILL.
DEFAULT_SHUTDOWN_TIMEOUT = 600
DEFAULT_MASTER_PORT = 29500


class LaunchError(ValueError):
    """A launch setting is missing or invalid; the message is one line naming it."""


@dataclass(frozen=True)
class TorchrunPlan:
    """Everything that decides the torchrun command line of one node."""

    nproc_per_node: int = 1
    nnodes: int = 1
    master_addr: str | None = None  # None with nnodes == 1: --standalone
    master_port: int = DEFAULT_MASTER_PORT
    run_id: str = "clip-distill"
    log_dir: str | None = None  # per-rank stdout/stderr files (torchrun --tee)
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT

    def validate(self) -> "TorchrunPlan":
        if self.nproc_per_node < 1:
            raise LaunchError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise LaunchError(f"nnodes must be >= 1, got {self.nnodes}")
        if self.nnodes > 1 and not self.master_addr:
            raise LaunchError(f"nnodes={self.nnodes} needs a master address "
                              "(--master-addr or MASTER_ADDR)")
        if not 1 <= self.master_port <= 65535:
            raise LaunchError(f"master_port must be in 1..65535, got {self.master_port}")
        return self


def torchrun_command(plan: TorchrunPlan, program: list[str], python: str = sys.executable) -> list[str]:
    """The argv of torchrun for `plan`, followed by the training program's arguments.

    `program` is what the ranks run: `["-m", "training", "--config", ...]` or a script path and
    its arguments. Restarts are off (--max-restarts=0): a failed rank ends the node's agent at
    once, and the job, not torchrun, decides whether to resume from the last checkpoint.
    """
    plan.validate()
    cmd = [python, "-m", "torch.distributed.run",
           f"--nproc-per-node={plan.nproc_per_node}", "--max-restarts=0",
           f"--shutdown-timeout={plan.shutdown_timeout}"]
    if plan.nnodes == 1 and not plan.master_addr:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        cmd += [f"--nnodes={plan.nnodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={plan.master_addr}:{plan.master_port}",
                f"--rdzv-id={plan.run_id}"]
    if plan.log_dir:
        # Every line a rank prints goes to the console with its global rank in front, and to
        # LOG_DIR/<run id>_*/attempt_0/<local rank>/{stdout,stderr}.log.
        cmd += [f"--log-dir={plan.log_dir}", "--tee=3",
                "--log-line-prefix-template=[rank${rank}]: "]
    return cmd + list(program)


def plan_from_args(args: argparse.Namespace, env: dict | os._Environ = os.environ) -> TorchrunPlan:
    """Arguments win over the environment; the environment wins over the defaults."""
    def pick(value, *names, default=None):
        if value is not None:
            return value
        for name in names:
            if env.get(name):
                return env[name]
        return default

    return TorchrunPlan(
        nproc_per_node=_as_int("nproc_per_node", pick(args.nproc_per_node, "NPROC_PER_NODE", default=1)),
        nnodes=_as_int("nnodes", pick(args.nnodes, "NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1)),
        master_addr=pick(args.master_addr, "MASTER_ADDR"),
        master_port=_as_int("master_port", pick(args.master_port, "MASTER_PORT", default=DEFAULT_MASTER_PORT)),
        run_id=str(pick(args.run_id, "RUN_ID", "SLURM_JOB_ID", default="clip-distill")),
        log_dir=args.log_dir,
        shutdown_timeout=args.shutdown_timeout,
    ).validate()


def _as_int(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{name} must be an integer, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.torchrun",
        description="Start the trainer under torchrun on this node (one node or one of N).",
        epilog="Everything after `--` goes to the trainer (default program: -m training).")
    parser.add_argument("--nproc-per-node", type=str, default=None, help="ranks on this node (GPUs)")
    parser.add_argument("--nnodes", type=str, default=None, help="nodes in the job")
    parser.add_argument("--master-addr", default=None, help="host of the c10d rendezvous")
    parser.add_argument("--master-port", type=str, default=None, help="port of the c10d rendezvous")
    parser.add_argument("--run-id", default=None, help="rendezvous id shared by all nodes")
    parser.add_argument("--log-dir", default=None, help="per-rank log files (and rank-prefixed console)")
    parser.add_argument("--shutdown-timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT,
                        help="seconds ranks get to checkpoint after a signal before SIGKILL")
    parser.add_argument("--script", default=None,
                        help="run this script instead of `-m training`")
    parser.add_argument("--ready-dir", default=None,
                        help="create a file here once SIGUSR1 is ignored (the job script waits "
                             "for one per node before it forwards a preemption signal)")
    parser.add_argument("--print", action="store_true", help="print the command, do not run it")
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trainer_args = args.trainer_args[1:] if args.trainer_args[:1] == ["--"] else args.trainer_args
    program = [args.script] if args.script else ["-m", "training"]
    try:
        cmd = torchrun_command(plan_from_args(args), program + trainer_args)
    except LaunchError as error:
        print(f"launch.torchrun: error: {error}", file=sys.stderr)
        return 2
    if args.print:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    ignore_preemption_signal()
    if args.ready_dir:
        mark_ready(args.ready_dir)
    os.execv(cmd[0], cmd)  # same pid: signals sent to this process reach the torchrun agent


def ignore_preemption_signal() -> None:
    """Make this process (and the torchrun agent exec'd into it) ignore SIGUSR1.

    The disposition survives exec and is inherited by the ranks, whose trainer installs its own
    SIGUSR1 handler; the agent, which installs none for it, would otherwise be killed by it.
    """
    signal.signal(PREEMPTION_SIGNAL, signal.SIG_IGN)


def mark_ready(ready_dir: str) -> None:
    """One file per node agent: from now on a SIGUSR1 can no longer kill this node's launch."""
    os.makedirs(ready_dir, exist_ok=True)
    open(os.path.join(ready_dir, f"{socket.gethostname()}-{os.getpid()}"), "w").close()


if __name__ == "__main__":
    sys.exit(main())
