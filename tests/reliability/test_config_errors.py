"""Config values the issue found accepted or reported badly (issue 14): each is ONE line at
config time (before any model, data or process group), naming the key, the value and where the
value came from (the override, not the YAML file)."""
from __future__ import annotations

import pytest

from tests.helpers.trainer import TINY_DISTILL
from training.config import ConfigError, load_config

BASE = ["data.train=x.tar", "run_dir=/tmp/unused", "model.teacher_pretrained=null",
        "model.student_init=null"]


@pytest.mark.parametrize("override, says", [
    ("eval.batch_size=0", "key eval.batch_size: must be >= 1, got 0"),
    ("eval.max_samples=-1", "key eval.max_samples: must be >= 1 or null, got -1"),
    ("deepspeed.dist_timeout_s=-1", "key deepspeed.dist_timeout_s: must be > 0"),
    ("optim.weight_decay=-1", "key optim.weight_decay: must be >= 0, got -1.0"),
    ("optim.eps=0", "key optim.eps: must be > 0, got 0.0"),
    ("optim.eps=abc", "key optim.eps: Value 'abc' of type 'str' could not be converted"),
])
def test_bad_value_is_one_line_naming_the_override(override, says):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_DISTILL, BASE + [override])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"override {override!r}: ")
    assert says in message


def test_a_bad_value_from_the_yaml_file_names_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(open(TINY_DISTILL).read() + "\neval:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}: key eval.batch_size: must be >= 1"):
        load_config(str(recipe), BASE)


def test_a_text_file_named_safetensors_as_teacher_is_refused(tmp_path):
    fake = tmp_path / "teacher.safetensors"
    fake.write_text("not weights\n")
    with pytest.raises(ConfigError) as err:
        load_config(TINY_DISTILL, BASE + [f"model.teacher_pretrained={fake}"])
    assert "\n" not in str(err.value)
    assert f"key model.teacher_pretrained: {fake} is not a safetensors file" in str(err.value)


def test_a_yaml_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"seed: 1\nrun_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}: not UTF-8 text \(byte 17 is 0xff\)$"):
        load_config(str(recipe), BASE)
