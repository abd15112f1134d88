"""`clip-status RUN_DIR`: where a run stands, read from its run directory alone.

    $ clip-status runs/exp1
    run        runs/exp1
    stage      done
    job        1 (restarts: 1, last event: done)
    checkpoint step_00000030 (2026-11-22 05:02:03 UTC)
    metrics    30 lines; last 3:
      step 28  loss 0.0345  lr 9.1e-05
      ...

It needs no SLURM and no torch: it reads config.yaml, metrics.jsonl, checkpoints/latest,
done.json, the trainer's heartbeat (running.json: host, pid, step, time; training/metrics.py) and
the job script's event log (logs/job-events.tsv: one line per start, signal, requeue, done or
failure, written by launch/templates/job.sbatch). Pointed at a `clip-stages` run root, it shows
every stage (RUN_ROOT/<stage>/ run directories).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone

EVENTS_FILE = os.path.join("logs", "job-events.tsv")
HEARTBEAT_FILE = "running.json"   # training/metrics.py
RUN_MARKERS = ("done.json", "metrics.jsonl", "checkpoints", "inherit", "config.yaml")
# A heartbeat from another host older than this (log.every_steps apart, evaluation included) no
# longer counts as running.
HEARTBEAT_STALE_S = 30 * 60


def read_events(run_dir: str) -> list[dict]:
    """The job script's events, oldest first: time, job, restart, event, detail."""
    path = os.path.join(run_dir, EVENTS_FILE)
    if not os.path.exists(path):
        return []
    events = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 4:
                events.append(dict(zip(("time", "job", "restart", "event", "detail"), parts + [""])))
    return events


def last_checkpoint(run_dir: str) -> dict | None:
    """The tag `checkpoints/latest` names (a file holding the tag, or a symlink) and its time."""
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if os.path.islink(latest):
        tag = os.path.basename(os.readlink(latest).rstrip("/"))
    elif os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
    else:
        return None
    written = datetime.fromtimestamp(os.lstat(latest).st_mtime, timezone.utc)
    return {"tag": tag, "written": written.strftime("%Y-%m-%d %H:%M:%S UTC")}


def read_metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl as dicts; a torn last line (a run still writing) is left out."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def heartbeat(run_dir: str, now: float | None = None) -> str | None:
    """"running ..." when the trainer's heartbeat says its process is alive: on this host, its
    pid exists; on another host, it wrote the heartbeat within HEARTBEAT_STALE_S. Else None."""
    try:
        with open(os.path.join(run_dir, HEARTBEAT_FILE)) as f:
            beat = json.load(f)
        host, pid, age = beat["host"], int(beat["pid"]), (now or time.time()) - float(beat["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    step = f"at step {beat['step']}" if beat.get("step") is not None else "starting"
    if host == socket.gethostname():
        return f"running ({step}, pid {pid})" if _pid_alive(pid) else None
    if age <= HEARTBEAT_STALE_S:
        return f"running ({step} on {host}, {age:.0f} s ago)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stage(run_dir: str, events: list[dict]) -> str:
    """done | running | requeued | failed | stopped | not started."""
    if os.path.exists(os.path.join(run_dir, "done.json")):
        return "done"
    last = events[-1]["event"] if events else None
    if last in ("start", "signal"):
        return "running" if last == "start" else "stopping (signal received)"
    if last == "requeue":
        return "requeued (waiting to resume)"
    if last == "failed":
        return "failed"
    running = heartbeat(run_dir)
    if running:
        return running
    if os.path.exists(os.path.join(run_dir, "checkpoints", "latest")):
        return "stopped (resumable from its last checkpoint)"
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return "running or stopped before its first checkpoint"
    return "not started"


def stage_dirs(root: str) -> list[str]:
    """The run directories under a `clip-stages` run root, by name (the root does not record the
    stage order)."""
    if any(os.path.exists(os.path.join(root, m)) for m in RUN_MARKERS):
        return []  # a run directory itself
    found = [entry.path for entry in os.scandir(root) if entry.is_dir()
             and any(os.path.exists(os.path.join(entry.path, m)) for m in RUN_MARKERS)]
    return sorted(found)


def run_status(run_dir: str, recent: int = 5) -> dict:
    """Everything `clip-status` prints, as a dict (for scripts and tests). For a `clip-stages`
    run root: each stage's status under "stages", and the root's stage summarising them."""
    stages = stage_dirs(run_dir)
    if stages:
        per_stage = {os.path.basename(path): run_status(path, recent) for path in stages}
        open_stages = {name: s["stage"] for name, s in per_stage.items() if s["stage"] != "done"}
        running = [name for name, s in open_stages.items() if s.startswith("running")]
        done = len(stages) - len(open_stages)
        summary = (f"done (all {len(stages)} stages)" if not open_stages else
                   f"stage {running[0]} {open_stages[running[0]]}, {done} of {len(stages)} "
                   f"stages done" if running else
                   f"{done} of {len(stages)} stages done; " + ", ".join(
                       f"{name}: {s}" for name, s in open_stages.items()))
        return {"run_dir": run_dir, "stage": summary, "stages": per_stage}
    events = read_events(run_dir)
    metrics = read_metrics(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    done_path = os.path.join(run_dir, "done.json")
    return {
        "run_dir": run_dir,
        "stage": stage(run_dir, events),
        "job": starts[-1]["job"] if starts else None,
        "restarts": max(len(starts) - 1, 0),
        "last_event": events[-1]["event"] if events else None,
        "checkpoint": last_checkpoint(run_dir),
        "metrics_lines": len(metrics),
        "recent_metrics": metrics[-recent:] if recent > 0 else [],
        "done": json.load(open(done_path)) if os.path.exists(done_path) else None,
    }


def _format_metric(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, (int, str)) and not isinstance(value, bool):
            parts.append(f"{key} {value}")
    return "  ".join(parts)


def format_status(status: dict) -> str:
    lines = [f"run        {status['run_dir']}", f"stage      {status['stage']}"]
    if "stages" in status:
        for name, sub_status in status["stages"].items():
            ckpt = sub_status["checkpoint"]
            lines.append(f"  {name}: {sub_status['stage']}"
                         + (f", checkpoint {ckpt['tag']}" if ckpt else ""))
        return "\n".join(lines)
    if status["job"] is not None:
        lines.append(f"job        {status['job']} (restarts: {status['restarts']}, "
                     f"last event: {status['last_event']})")
    ckpt = status["checkpoint"]
    lines.append(f"checkpoint {ckpt['tag']} ({ckpt['written']})" if ckpt else "checkpoint none")
    recent = status["recent_metrics"]
    lines.append(f"metrics    {status['metrics_lines']} lines" + (f"; last {len(recent)}:" if recent else ""))
    lines += [f"  {_format_metric(record)}" for record in recent]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip-status", description=(
        "Show a run's stage, last checkpoint, restarts and recent metrics."))
    parser.add_argument("run_dir")
    parser.add_argument("--recent", type=int, default=5, help="metrics lines to show")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        print(f"clip-status: error: {args.run_dir}: no such run directory", file=sys.stderr)
        return 2
    status = run_status(args.run_dir, args.recent)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
