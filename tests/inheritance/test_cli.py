"""clip-inherit: the checkpoint files, the record, the no-op rerun, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.inheritance import model
from tests.helpers.shards import make_synthetic_shards
from training import models
from training.specs import build_student
from training.inheritance.cli import main
from training.inheritance.record import file_sha256

TEACHER, STUDENT = "Tiny-ViT-Teacher", "Tiny-ViT-Student"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(model(TEACHER, seed=3).state_dict(), str(path))
    return path


def _run(out, teacher_file, *extra):
    return main(["--teacher", TEACHER, "--teacher-pretrained", str(teacher_file),
                 "--student", STUDENT, "--out", str(out), *extra])


def test_writes_weights_and_record_that_a_student_loads(tmp_path, teacher_file):
    assert _run(tmp_path, teacher_file, "--width", "weight-norm", "--depth", "interval") == 0
    record = json.loads((tmp_path / "inheritance.json").read_text())
    assert record["inputs"]["teacher"]["weights_sha256"] == file_sha256(teacher_file)
    assert record["inputs"]["student"]["model_cfg"]["vision_cfg"]["width"] == 64
    assert record["mapping"]["depth"]["visual.transformer.resblocks"] == [0, 2]
    assert record["mapping"]["width_rule"] == "importance"
    assert record["weights"]["sha256"] == file_sha256(tmp_path / "student.safetensors")
    student, _ = build_student(STUDENT, init_state_dict=tmp_path / "student.safetensors")
    assert record["param_counts"]["student"] == models.tower_param_counts(student)
    teacher = load_file(str(teacher_file))
    hidden = torch.tensor(record["mapping"]["units"]["visual.hidden"])
    assert torch.equal(student.visual.ln_post.weight, teacher["visual.ln_post.weight"][hidden])
    assert torch.equal(student.transformer.resblocks[1].ln_1.bias,
                       teacher["transformer.resblocks.2.ln_1.bias"][torch.tensor(
                           record["mapping"]["units"]["text.hidden"])])


def test_rerun_with_same_inputs_is_a_noop(tmp_path, teacher_file, caplog):
    assert _run(tmp_path, teacher_file) == 0
    weights = tmp_path / "student.safetensors"
    stamp = weights.stat().st_mtime_ns
    caplog.set_level("INFO")
    assert _run(tmp_path, teacher_file) == 0
    assert "up to date" in caplog.text and weights.stat().st_mtime_ns == stamp
    assert _run(tmp_path, teacher_file, "--depth", "first") == 0  # other inputs: redone
    assert json.loads((tmp_path / "inheritance.json").read_text())["inputs"]["method"]["depth"] == "first"
    weights.write_bytes(weights.read_bytes()[:-7])  # a damaged weights file is redone too
    assert _run(tmp_path, teacher_file, "--depth", "first") == 0
    assert file_sha256(weights) == json.loads((tmp_path / "inheritance.json").read_text())["weights"]["sha256"]
    assert not list(tmp_path.glob("*.tmp"))


def test_activation_width_reads_real_shards(tmp_path, teacher_file):
    shards = make_synthetic_shards(tmp_path / "data", train=24, val=0, zeroshot=0, samples_per_shard=8)
    out = tmp_path / "out"
    assert _run(out, teacher_file, "--width", "activation", "--data", shards["train_shards"],
                "--batches", "2", "--batch-size", "8") == 0
    record = json.loads((out / "inheritance.json").read_text())
    assert record["inputs"]["method"]["data"] == shards["train_shards"]
    assert len(record["mapping"]["units"]["visual.transformer.resblocks.3.mlp"]) == 256


@pytest.mark.parametrize("extra, message", [
    (["--width", "activation"], "needs --data"),
    (["--student", "Inherit-Tiny-RN-Student"], "same family"),
    (["--teacher-pretrained", "/nonexistent/t.safetensors"], "not found"),
])
def test_bad_input_is_one_line(tmp_path, teacher_file, capsys, extra, message):
    assert _run(tmp_path, teacher_file, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "inheritance.json").exists()


@pytest.mark.slow
def test_module_entry_point(tmp_path, teacher_file):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-m", "training.inheritance", "--teacher", TEACHER,
                           "--teacher-pretrained", str(teacher_file), "--student", STUDENT,
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "student.safetensors").is_file() and (tmp_path / "inheritance.json").is_file()
