"""`model.student_init: teacher`: the student inherited in-process from the configured teacher.

The run starts from exactly the tensors `clip-inherit` (python -m training.inheritance, its
default rule) writes, trains exactly like a run started from that file, resumes exactly (from
the checkpoint, without inheriting again), and the refusals are one line naming
model.student_init: no teacher weights to inherit from (config time), a student that cannot
inherit from the teacher (before any training). Real Trainers in one worker process
(teacher_init_worker.py).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.torchrun import torchrun_env
from tests.helpers.trainer import REPO_ROOT, TINY_DISTILL
from training.config import ConfigError, load_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher-init")
    worker = subprocess.run(
        [sys.executable, "tests/inheritance/teacher_init_worker.py", str(root),
         str(root / "out.json")], cwd=REPO_ROOT, env=torchrun_env(), capture_output=True,
        text=True, timeout=600)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    return json.loads((root / "out.json").read_text())


@pytest.mark.slow
def test_the_run_starts_from_the_tensors_clip_inherit_writes(runs):
    assert runs["init_tensors"] > 50 and len(runs["init_equal"]) == runs["init_tensors"]


@pytest.mark.slow
def test_it_trains_as_the_run_from_the_inherited_file_and_resumes_exactly(runs):
    losses = runs["losses"]
    assert sorted(losses["teacher"], key=int) == ["1", "2", "3", "4"]
    assert losses["file"] == losses["teacher"]  # same start, same RNG streams: equal losses
    assert runs["stopped_at"] == 2
    assert losses["resumed"] == pytest.approx(losses["teacher"], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_a_student_that_cannot_inherit_is_refused_in_one_line(runs):
    message = runs["refusal"]
    assert message.startswith("key model.student_init: teacher: ") and "\n" not in message
    assert "not supported" in message  # the inheritance code's own reason (a MobileNet tower)


@pytest.mark.parametrize("overrides", [
    ["model.teacher_pretrained=null"],  # no weights to inherit from
    ["model.teacher_pretrained=null", "model.teacher_source=shards",
     "model.teacher_embeddings=teacher-embeddings"],  # stored embeddings, no weights
    ["model.teacher=null", "model.teacher_pretrained=null", "loss.affinity_weight=0",
     "loss.clip_weight=1", "loss.fixed_logit_scale=null"],  # no teacher at all
])
def test_no_teacher_weights_is_a_one_line_config_error(overrides):
    with pytest.raises(ConfigError) as err:  # tiny-distill.yaml ships student_init: teacher
        load_config(TINY_DISTILL, ["data.train=x.tar", *overrides])
    assert "key model.student_init: 'teacher' inherits the teacher's weights" in str(err.value)
    assert "\n" not in str(err.value)


def test_the_cli_refuses_it_in_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "training", "--config", TINY_DISTILL,
                             "data.train=x.tar", "model.teacher_pretrained=null"], cwd=REPO_ROOT,
                            env=torchrun_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "model.student_init" in result.stderr
