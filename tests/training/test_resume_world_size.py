"""Elastic resume (issue 13) under torchrun (gloo, CPU), at ZeRO-1 and ZeRO-3.

96 samples, a global batch of 16 (8 per rank on 2 ranks): 6 steps per epoch, 8 steps in all.
  ref:  2 ranks, uninterrupted, a checkpoint every 3 steps.
  2->1: ref's checkpoint at step 3 (mid-epoch) resumed on 1 rank (2 micro-batches per step).
  1->2: that run's checkpoint at step 6 resumed on 2 ranks.
Every step's samples are recorded from the loader (resume_world_worker.py). Asserted: the epoch's
96 samples each trained exactly once across the interrupted runs, each step on the samples the
uninterrupted run used, and the per-step losses equal the uninterrupted run's within 1e-5
relative (the global order does not depend on the world size, so the reference at either world
size is the same run; at ZeRO-1 an uninterrupted 1-rank run shows that too). Runs of the same
world size share a launch: 3 torchrun launches for both stages.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.torchrun import run_torchrun
from tests.helpers.trainer import TINY_DISTILL, read_metrics, step_losses, tiny_overrides

pytestmark = pytest.mark.slow
STEPS, PER_EPOCH, SAMPLES = 8, 6, 96
ZEROS = (1, 3)
WORKER = "tests/training/resume_world_worker.py"


def args(run_dir: Path, shards: str, zero: int) -> list[str]:
    return [TINY_DISTILL, *tiny_overrides(shards, run_dir, steps=STEPS),
            f"deepspeed.zero_stage={zero}", "checkpoint.resume=latest", "checkpoint.every_steps=3",
            "checkpoint.keep_last=5", "checkpoint.export_at_end=false"]


def train(runs: list[list[str]], nproc: int, root: Path) -> None:
    """Train `runs` ([config, key=value, ...] each) one after another in one torchrun launch."""
    plan = root / f"launch-{len(list(root.glob('launch-*.json')))}.json"
    plan.write_text(json.dumps(runs))
    run_torchrun([WORKER, plan], nproc=nproc, timeout=900)


def resume_copy(source: Path, target: Path, tag: str) -> None:
    """`target` as a run killed right after `source` saved `tag` (later tags never written)."""
    shutil.copytree(source / "checkpoints", target / "checkpoints")
    for later in (target / "checkpoints").glob("step-*"):
        if later.name > tag:
            shutil.rmtree(later)
    (target / "checkpoints" / "latest").write_text(tag + "\n")


def steps_trained(run_dir: Path) -> dict[int, dict]:
    """step -> {"epoch", "keys"} over all ranks (rank order)."""
    steps: dict[int, dict] = {}
    for path in sorted(run_dir.glob("keys-rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            step = steps.setdefault(record["step"], {"epoch": record["epoch"], "keys": []})
            step["keys"] += record["keys"]
    return steps


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("elastic-shards"), train=SAMPLES, val=0,
                                 zeroshot=0, samples_per_shard=16)


@pytest.fixture(scope="module")
def all_runs(shards, tmp_path_factory):
    """Both stages' runs in 3 launches: the references (2 ranks), the 2->1 resumes and ZeRO-1's
    uninterrupted 1-rank run (1 rank), the 1->2 resumes (2 ranks)."""
    root, train_shards = tmp_path_factory.mktemp("elastic"), shards["train_shards"]
    dirs = {zero: {name: root / f"zero{zero}" / name for name in ("ref", "to1", "to2")}
            for zero in ZEROS}
    train([args(dirs[zero]["ref"], train_shards, zero) for zero in ZEROS], nproc=2, root=root)
    for zero in ZEROS:
        resume_copy(dirs[zero]["ref"], dirs[zero]["to1"], "step-00000003")
    one_rank = root / "zero1" / "one-rank"
    train([*(args(dirs[zero]["to1"], train_shards, zero) for zero in ZEROS),
           [TINY_DISTILL, *tiny_overrides(train_shards, one_rank, steps=STEPS),
            "optim.grad_accum_steps=2", "deepspeed.zero_stage=1",
            "checkpoint.export_at_end=false"]], nproc=1, root=root)
    for zero in ZEROS:
        resume_copy(dirs[zero]["to1"], dirs[zero]["to2"], "step-00000006")
    train([args(dirs[zero]["to2"], train_shards, zero) for zero in ZEROS], nproc=2, root=root)
    return {zero: {"zero": zero, **dirs[zero]} for zero in ZEROS} | {"one_rank": one_rank}


@pytest.fixture(scope="module", params=ZEROS, ids=["zero1", "zero3"])
def runs(request, all_runs):
    return all_runs[request.param]


def test_losses_after_each_resume_equal_the_uninterrupted_run(runs):
    reference = step_losses(runs["ref"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    for name, first in (("to1", 4), ("to2", 7)):
        resumed = step_losses(runs[name])
        assert sorted(resumed) == list(range(first, STEPS + 1)), name
        for step in resumed:
            assert resumed[step] == pytest.approx(reference[step], rel=1e-5), (name, step)
        assert step_losses(runs[name], "lr") == {s: step_losses(runs["ref"], "lr")[s]
                                                 for s in resumed}


def test_every_sample_of_the_epoch_is_trained_once_across_world_sizes(runs):
    reference, to1, to2 = (steps_trained(runs[n]) for n in ("ref", "to1", "to2"))
    interrupted = {**{s: reference[s] for s in (1, 2, 3)}, **to1}
    interrupted.update({s: to2[s] for s in (7, 8)})
    assert sorted(interrupted) == list(range(1, STEPS + 1))
    epoch0 = [k for s in range(1, PER_EPOCH + 1) for k in interrupted[s]["keys"]]
    assert len(epoch0) == len(set(epoch0)) == SAMPLES  # each of the 96 exactly once
    assert all(interrupted[s]["epoch"] == (s - 1) // PER_EPOCH for s in interrupted)
    for step in interrupted:  # each step on the samples the uninterrupted run used
        assert sorted(interrupted[step]["keys"]) == sorted(reference[step]["keys"]), step
    assert sorted(len(to1[s]["keys"]) for s in to1) == [16] * 5  # the global batch kept


def test_the_resumed_runs_record_their_world_and_drop_the_conversion_and_lock(runs):
    for name, world, accum in (("to1", 1, 2), ("to2", 2, 1)):
        record = json.loads((runs[name] / "checkpoints" / "step-00000008" / "run.json")
                            .read_text())
        assert (record["world_size"], record["global_batch"], record["lanes"]) == (world, 16, 2)
        assert record["config"]["optim"]["grad_accum_steps"] == accum
        assert not (runs[name] / "checkpoints" / "universal").exists()
        assert not (runs[name] / ".lock").exists()  # released when the run ended
        assert read_metrics(runs[name])[-1]["step"] == STEPS


def test_an_uninterrupted_run_on_one_rank_equals_the_two_rank_run(runs, all_runs):
    if runs["zero"] != 1:
        pytest.skip("one reference run at ZeRO-1 is enough")
    one, two = step_losses(all_runs["one_rank"]), step_losses(runs["ref"])
    assert sorted(one) == sorted(two)
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5), step
