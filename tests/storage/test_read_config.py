"""The data keys of remote reads: bad values are one line naming the key, before any work."""
from __future__ import annotations

import pytest

from training.config_files import ConfigError
from training.data import DataConfig
from training.data.sources import ReadPolicy


@pytest.mark.parametrize("key,value,message", [
    ("read_timeout_s", 0, "key data.read_timeout_s: must be a number of seconds > 0, got 0"),
    ("read_timeout_s", float("inf"), "key data.read_timeout_s: must be a number of seconds > 0, got inf"),
    ("retry_backoff_s", -0.5, "key data.retry_backoff_s: must be a number of seconds >= 0, got -0.5"),
    ("read_retries", -1, "key data.read_retries: must be an integer >= 0, got -1"),
    ("read_ahead", 1.5, "key data.read_ahead: must be an integer >= 0, got 1.5"),
])
def test_bad_read_settings_are_one_line(key, value, message):
    with pytest.raises(ConfigError) as error:
        DataConfig(train="shard.tar", **{key: value}).validate()
    assert str(error.value) == message


def test_read_policy_comes_from_the_data_section():
    cfg = DataConfig(train="s3://b/x.tar", read_timeout_s=7.5, read_retries=0, retry_backoff_s=0,
                     read_ahead=3)
    cfg.validate()
    assert ReadPolicy.from_config(cfg) == ReadPolicy(timeout_s=7.5, retries=0, backoff_s=0, read_ahead=3)
