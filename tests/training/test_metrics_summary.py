"""The end of a run and its W&B identity (training/metrics.py): the summary names steps, samples,
final metrics and the export; a resumed run continues the same W&B run (offline mode, real wandb)."""
import re

from training.config import LogConfig
from training.metrics import WANDB_ID_FILE, MetricsLogger


def logger(run_dir, wandb="disabled", rank=0) -> MetricsLogger:
    return MetricsLogger(LogConfig(tensorboard=False, wandb=wandb), str(run_dir), rank=rank,
                         world_size=2, total_steps=10, samples_per_step=32)


def test_summary_names_steps_samples_final_metrics_and_the_export(tmp_path):
    metrics = logger(tmp_path)
    metrics.step_done(0.0)
    metrics.log_train(10, {"loss": 1.25, "clip": 0.5, "lr": 1e-3})
    metrics.log_eval(10, {"val/image_to_text_R@1": 0.375})
    text = metrics.summary(10, 320, str(tmp_path / "export"))
    metrics.close()
    lines = text.splitlines()
    assert re.fullmatch(rf"done: 10 of 10 steps, 320 samples seen, 0:00:\d\d in this process; "
                        rf"run directory {re.escape(str(tmp_path))}", lines[0])
    assert lines[1:] == ["  final train: loss 1.2500 clip 0.5000",
                         "  final eval:  val/image_to_text_R@1 0.3750",
                         f"  export:      {tmp_path / 'export'}"]
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2  # the summary adds no record


def test_a_resume_continues_the_same_wandb_run(tmp_path):
    first = logger(tmp_path, wandb="offline")
    first.log_train(5, {"loss": 2.0})
    first.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    second = logger(tmp_path, wandb="offline")  # the resumed process
    second.log_train(10, {"loss": 1.0})
    second.close()
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)
