"""The trainer as `clip-train` runs it, recording which samples each optimizer step trained on:
RUN_DIR/keys-rank<r>.jsonl, one line per step {"step", "epoch", "keys"} (the keys of the step's
micro-batches as this rank's loader delivered them). For tests/training/test_resume_world_size.py.

    torchrun --nproc_per_node 2 tests/training/resume_world_worker.py RUNS.json

RUNS.json: a list of runs, each [config, key=value, ...], trained one after another in this
launch (the imports and the process start paid once).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from training.cli import setup_logging
from training.config import load_config
from training.trainer import Trainer


class KeyRecordingTrainer(Trainer):
    def train_step(self, micro_batches: list[dict]):
        keys = [key for batch in micro_batches for key in batch["key"]]
        record = {"step": self.train_state.step + 1, "epoch": self.data_position.epoch,
                  "keys": keys}
        path = os.path.join(self.cfg.run_dir, f"keys-rank{self.dist.rank}.jsonl")
        with open(path, "a") as out:
            out.write(json.dumps(record) + "\n")
        return super().train_step(micro_batches)


if __name__ == "__main__":
    setup_logging()
    for config, *overrides in json.loads(Path(sys.argv[1]).read_text()):
        KeyRecordingTrainer(load_config(config, overrides)).train()
