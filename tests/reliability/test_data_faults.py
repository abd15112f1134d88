"""Data faults on the trainer's side (issue 14): shards whose every image is undecodable (the
header parses) used to loop forever in exact epochs when fewer than corrupt_min_samples were read;
now the first batch with no usable sample is one line, counted by reason, at once."""
from __future__ import annotations

import pytest

from tests.helpers.data_pipeline import jpeg_bytes, train_loader, write_tar
from training.data import DataConfig, DataError


@pytest.mark.parametrize("workers", [0, 1])
def test_all_undecodable_shards_end_in_one_line_not_a_hang(tmp_path, workers):
    samples = [{"__key__": f"s{i:04d}", "jpg": jpeg_bytes(i)[:120], "txt": "a caption"}
               for i in range(24)]  # the JPEG header parses, the pixels do not
    write_tar(tmp_path / "bad-0.tar", samples)
    loader = train_loader(DataConfig(train=str(tmp_path / "bad-0.tar"), batch_size=8,
                                     workers=workers, corrupt_min_samples=1000,
                                     shuffle_buffer=0))
    assert len(loader) == 3
    with pytest.raises(DataError) as err:
        list(loader)
    message = str(err.value)
    assert "\n" not in message and "no usable sample in batch 0" in message
    assert str(tmp_path / "bad-0.tar") in message and "'undecodable_image': 8" in message


def test_a_few_undecodable_samples_are_replaced_within_their_batch_and_counted(tmp_path):
    samples = [{"__key__": f"s{i:04d}", "jpg": jpeg_bytes(i)[:120] if i in (1, 9) else
                jpeg_bytes(i), "txt": f"caption {i}"} for i in range(16)]
    write_tar(tmp_path / "some-0.tar", samples)
    loader = train_loader(DataConfig(train=str(tmp_path / "some-0.tar"), batch_size=8,
                                     workers=0, shuffle_buffer=0))
    keys = [batch["key"] for batch in loader]
    assert [len(k) for k in keys] == [8, 8]
    assert not {"s0001", "s0009"} & set(keys[0] + keys[1])
    assert len(set(keys[0] + keys[1])) == 14
    stats = loader.stats()
    assert stats["corrupt_by_reason"] == {"undecodable_image": 2}
    assert stats["samples_repeated"] == 2
