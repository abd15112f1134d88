"""What a run reports: a console line, RUN_DIR/metrics.jsonl, TensorBoard and W&B.

Only rank 0 writes. The trainer hands over plain floats (already averaged over ranks) at each
log step; this module adds throughput, data-wait time and ETA, and fans the record out to the
sinks. Plain logging, no progress bar: the output goes to SLURM log files as often as to a tty.
A run ends with a summary (steps, samples, time, final metrics, export). W&B: the run id is kept
in RUN_DIR/wandb_run_id, so every resume of a run continues the same W&B run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from typing import Optional

from training.config import LogConfig
from training.files import write_json_atomic, write_text_atomic

log = logging.getLogger("training")
WANDB_ID_FILE = "wandb_run_id"
# While rank 0 trains: {"host", "pid", "step", "time"}, rewritten at every log step and removed at
# the end; `clip-status` reads it to tell a running run from a stopped one (also without SLURM).
HEARTBEAT_FILE = "running.json"


def is_loss(key: str) -> bool:
    """The total, a loss term by its registered name (training/objectives), or a regulariser
    (a masked student's arrive as loss_<name>)."""
    from training.objectives import TERMS
    return key == "loss" or key in TERMS or key.startswith("loss_")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id of this run directory: made once, then read back by every resume."""
    path = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
    write_text_atomic(path, run_id + "\n")
    return run_id


class MetricsLogger:
    def __init__(self, cfg: LogConfig, run_dir: str, *, rank: int, world_size: int,
                 total_steps: int, samples_per_step: int, config: Optional[dict] = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.total_steps, self.samples_per_step = total_steps, samples_per_step
        self.enabled = rank == 0
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._window_wait = 0.0
        self._jsonl = self._tb = self._wandb = None
        self.run_dir = run_dir
        self._started = time.perf_counter()
        self._last_train: dict = {}
        self._last_eval: dict = {}
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._heartbeat(step=None)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if cfg.wandb != "disabled":
            import wandb
            self._wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb, dir=run_dir,
                                     config=config, name=os.path.basename(run_dir.rstrip("/")),
                                     id=wandb_run_id(run_dir), resume="allow")

    def step_done(self, data_wait_s: float) -> None:
        """Called every optimizer step (cheap): accumulates the window's timing."""
        self._window_steps += 1
        self._window_wait += data_wait_s

    def log_train(self, step: int, values: dict[str, float]) -> Optional[dict]:
        """Write one record for `step` (values: losses, lr, logit scales, data stats)."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        steps = max(self._window_steps, 1)
        samples_per_s = self._window_steps * self.samples_per_step / elapsed
        record = {"step": step, **values,
                  "samples_per_s": samples_per_s,
                  "samples_per_s_per_rank": samples_per_s / self.world_size,
                  "step_time_s": elapsed / steps,
                  "data_wait_s": self._window_wait / steps,
                  "eta_s": (self.total_steps - step) * elapsed / steps}
        self._window_start, self._window_steps, self._window_wait = now, 0, 0.0
        self._last_train = {k: values[k] for k in sorted(filter(is_loss, values),
                                                         key=lambda k: k != "loss")}
        if not self.enabled:
            return record
        losses = " ".join(f"{k} {v:.4f}" for k, v in self._last_train.items())
        scales = " ".join(f"{k} {v:.1f}" for k, v in values.items() if "scale" in k)
        log.info(f"step {step}/{self.total_steps} | {losses} | lr {values.get('lr', 0):.3g} | "
                 f"{scales} | {samples_per_s:.1f} samples/s ({samples_per_s / self.world_size:.1f}"
                 f"/rank) | data wait {record['data_wait_s'] * 1000:.0f} ms/step | "
                 f"eta {format_duration(record['eta_s'])}")
        self._write(record, step, prefix="train")
        self._heartbeat(step)
        return record

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled or not values:
            return
        self._last_eval = dict(values)
        log.info(f"eval step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in values.items()))
        self._write({"step": step, **{f"eval/{k}": v for k, v in values.items()}}, step,
                    prefix=None)

    def _write(self, record: dict, step: int, prefix: Optional[str]) -> None:
        self._jsonl.write(json.dumps({**record, "time": time.time()}) + "\n")
        self._jsonl.flush()
        scalars = {(f"{prefix}/{k}" if prefix else k): v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def summary(self, step: int, samples_seen: int, export_dir: Optional[str]) -> str:
        """The end-of-run lines (logged on rank 0 and returned): steps, samples, this process's
        time, the last logged losses and evaluation, and where the model went."""
        lines = [f"done: {step} of {self.total_steps} steps, {samples_seen} samples seen, "
                 f"{format_duration(time.perf_counter() - self._started)} in this process; "
                 f"run directory {self.run_dir}"]
        if self._last_train:
            lines.append("  final train: " + " ".join(
                f"{k} {v:.4f}" for k, v in self._last_train.items()))
        if self._last_eval:
            lines.append("  final eval:  " + " ".join(
                f"{k} {v:.4f}" for k, v in self._last_eval.items()))
        lines.append(f"  export:      {export_dir}" if export_dir else
                     "  export:      none (checkpoint.export_at_end=false)")
        text = "\n".join(lines)
        if self.enabled:
            log.info(text)
        return text

    def _heartbeat(self, step: Optional[int]) -> None:
        write_json_atomic(os.path.join(self.run_dir, HEARTBEAT_FILE),
                          {"host": socket.gethostname(), "pid": os.getpid(), "step": step,
                           "time": time.time()})

    def close(self) -> None:
        if self.enabled:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.run_dir, HEARTBEAT_FILE))
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
