"""`clip-status RUN_DIR` reads stage, checkpoint, restarts and metrics from the run directory."""
import json
import os
import subprocess
import sys

from launch.status import run_status


def write_run(run_dir, events, steps, latest=None, done=False):
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "job-events.tsv").write_text("".join(
        f"2026-11-22T05:00:0{i}Z\t17\t{restart}\t{event}\t\n" for i, (restart, event) in enumerate(events)))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-3}) + "\n")
        f.write('{"step": 99, "lo')  # a line still being written is skipped
    if latest:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "latest").write_text(latest + "\n")
    if done:
        (run_dir / "done.json").write_text(json.dumps({"step": steps[-1]}))


def test_requeued_run(tmp_path):
    write_run(tmp_path, [(0, "start"), (0, "signal"), (0, "requeue")], range(1, 7), latest="step-00000006")
    status = run_status(str(tmp_path), recent=2)
    assert status["stage"] == "requeued (waiting to resume)"
    assert (status["job"], status["restarts"], status["checkpoint"]["tag"]) == ("17", 0, "step-00000006")
    assert status["metrics_lines"] == 6 and [m["step"] for m in status["recent_metrics"]] == [5, 6]


def test_finished_run_after_one_restart_and_cli_output(tmp_path):
    write_run(tmp_path, [(0, "start"), (0, "signal"), (0, "requeue"), (1, "start"), (1, "done")],
              range(1, 11), latest="step-00000010", done=True)
    assert run_status(str(tmp_path))["restarts"] == 1
    out = subprocess.run([sys.executable, "-m", "launch.status", str(tmp_path), "--recent", "1"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[1:3] == ["stage      done", "job        17 (restarts: 1, last event: done)"]
    assert out[3].startswith("checkpoint step-00000010 (")
    assert out[4:] == ["metrics    10 lines; last 1:", "  step 10  loss 0.1  lr 0.001"]
    as_json = subprocess.run([sys.executable, "-m", "launch.status", str(tmp_path), "--json"],
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(as_json)["done"] == {"step": 10}


def test_run_without_slurm_and_missing_dir(tmp_path):
    assert run_status(str(tmp_path))["stage"] == "not started"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000004")
    assert run_status(str(tmp_path))["stage"] == "stopped (resumable from its last checkpoint)"
    bad = subprocess.run([sys.executable, "-m", "launch.status", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == f"clip-status: error: {tmp_path / 'nope'}: no such run directory"


def test_a_run_training_without_slurm_is_running_and_a_dead_one_is_stopped(tmp_path):
    """The trainer's heartbeat (training/metrics.py) tells running from stopped, without SLURM."""
    from training.config import LogConfig
    from training.metrics import MetricsLogger

    metrics = MetricsLogger(LogConfig(tensorboard=False), str(tmp_path), rank=0, world_size=1,
                            total_steps=10, samples_per_step=4)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000004")
    metrics.step_done(0.0)
    metrics.log_train(4, {"loss": 1.0})
    assert run_status(str(tmp_path))["stage"] == f"running (at step 4, pid {os.getpid()})"
    # a process that died without closing (kill -9, preemption) leaves its heartbeat behind
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    beat = json.loads((tmp_path / "running.json").read_text())
    (tmp_path / "running.json").write_text(json.dumps({**beat, "pid": int(dead)}))
    assert run_status(str(tmp_path))["stage"] == "stopped (resumable from its last checkpoint)"
    metrics.close()  # a run that ends removes it
    assert not (tmp_path / "running.json").exists()


def test_a_clip_stages_root_shows_every_stage(tmp_path):
    for name, done in (("a-inherit", True), ("b-prune", True)):
        write_run(tmp_path / name, [], range(1, 4), latest="step-00000003", done=done)
    status = run_status(str(tmp_path))
    assert status["stage"] == "done (all 2 stages)"
    assert {name: s["stage"] for name, s in status["stages"].items()} == {
        "a-inherit": "done", "b-prune": "done"}
    (tmp_path / "b-prune" / "done.json").unlink()
    assert run_status(str(tmp_path))["stage"] == (
        "1 of 2 stages done; b-prune: stopped (resumable from its last checkpoint)")
    out = subprocess.run([sys.executable, "-m", "launch.status", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[2:] == ["  a-inherit: done, checkpoint step-00000003",
                       "  b-prune: stopped (resumable from its last checkpoint), checkpoint step-00000003"]
