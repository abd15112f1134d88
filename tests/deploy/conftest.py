"""One tiny trained student shared by the deploy tests, with every record a card reads: a
teacher weights file, a clip-inherit record, synthetic shards with manifests, a short
distillation run (checkpoint, metrics.jsonl with an evaluation, done.json) and its full export."""
import subprocess
import sys

import pytest

from tests.helpers.trainer import REPO_ROOT, TINY_DISTILL, tiny_overrides

STEPS = 6


@pytest.fixture(scope="package")
def trained(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from tests.helpers.shards import make_synthetic_shards
    from training.inheritance.cli import main as inherit
    from training.specs import model_spec

    root = tmp_path_factory.mktemp("deploy")
    data = make_synthetic_shards(root / "data", train=96, val=0, zeroshot=60,
                                 samples_per_shard=32)
    torch.manual_seed(0)
    teacher = root / "teacher.safetensors"
    save_file(model_spec("Tiny-ViT-Teacher").build().state_dict(), str(teacher))
    assert inherit(["--teacher", "Tiny-ViT-Teacher", "--teacher-pretrained",
                    str(teacher), "--student", "Tiny-ViT-Student",
                    "--out", str(root / "inherit")]) == 0
    run_dir = root / "run"
    args = ["--config", TINY_DISTILL, *tiny_overrides(data["train_shards"], run_dir, STEPS),
            f"model.teacher_pretrained={teacher}",
            f"model.student_init={root / 'inherit' / 'student.safetensors'}",
            "deepspeed.zero_stage=0", f"eval.zeroshot={data['zeroshot']}",
            "eval.batch_size=30"]
    result = subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {**data, "root": root, "run_dir": run_dir, "teacher": teacher}


@pytest.fixture(scope="package")
def exported(trained):
    """`clip-export RUN_DIR` with every format and zero-shot on the labelled set."""
    from training.deploy.cli import main

    out = trained["root"] / "export"
    assert main([str(trained["run_dir"]), "--out", str(out),
                 "--zeroshot", str(trained["zeroshot"])]) == 0
    return out
