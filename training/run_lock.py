"""One trainer per run folder: RUN_DIR/.lock names the job that trains in it.

    lock = RunLock(run_dir); lock.acquire()   # every rank, before anything reads checkpoints
    ...; lock.release()                       # rank 0, when the run ends or is preempted

The lock is a JSON file created exclusively (O_EXCL) holding the job's token, host, pid and start
time. The ranks of one job share a token (the SLURM job id, which a requeued job keeps; else
torchrun's run id; else, under another launcher, the rendezvous address; else the pid of a single
process), so they all pass. Another job gets one line
naming the holder. A lock whose process is gone (same host, pid not alive: a killed run) is taken
over with a warning. A holder on another host cannot be checked from here: the message says to
remove the file if that run is gone.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from training.files import write_json_atomic

log = logging.getLogger(__name__)

LOCK = ".lock"


def job_token(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT") and env.get("WORLD_SIZE", "1") != "1":
        # another launcher (deepspeed's, mpirun): its ranks share the rendezvous address
        return f"job:{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    return f"pid:{os.getpid()}"


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell: assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError, TypeError):
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK)
        self.me = {"token": job_token(), "host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self, attempts: int = 50) -> None:
        """ValueError in one line when run_dir cannot be written or another job holds it."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as err:
            raise ValueError(f"run_dir {self.run_dir}: cannot be created ({err.strerror})"
                             ) from None
        for _ in range(attempts):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            except OSError as err:
                raise ValueError(f"run_dir {self.run_dir}: not writable ({err.strerror})") from None
            else:
                with os.fdopen(fd, "w") as out:
                    json.dump(self.me, out)
                return
            holder = self._holder()
            if holder is None:  # being written by a peer this instant
                time.sleep(0.1)
                continue
            if holder.get("token") == self.me["token"]:
                return
            if _alive(holder):
                raise ValueError(
                    f"run_dir {self.run_dir}: another trainer runs in it (job "
                    f"{holder.get('token')}, pid {holder.get('pid')} on {holder.get('host')}, "
                    f"since {holder.get('started')}); wait for it, use another run_dir, or "
                    f"remove {self.path} if that run is gone")
            log.warning(f"{self.path}: taking over the lock of a run that is gone "
                        f"(pid {holder.get('pid')} on {holder.get('host')})")
            write_json_atomic(self.path, self.me)
            time.sleep(0.05)  # another starter may have taken it over too: the last write wins
        raise ValueError(f"run_dir {self.run_dir}: {self.path} is unreadable; remove it if no "
                         f"trainer runs in this run_dir")

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Remove the lock if this job still holds it."""
        holder = self._holder()
        if holder is not None and holder.get("token") == self.me["token"]:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
