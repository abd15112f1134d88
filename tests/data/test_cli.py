"""The CLI as users run it: `python -m data_tools` / `clip-data` in a subprocess, a SIGKILL in
the middle of a conversion then a rerun (byte-identical to an uninterrupted run), parallel
workers on a real converter, and no traceback on bad input."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.cli import main

REPO = Path(__file__).resolve().parents[2]


def clip_data(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "data_tools", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def tars(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


SYNTHETIC = ("synthetic", "--train", "2400", "--val", "0", "--zeroshot", "0",
             "--samples-per-shard", "200", "--image-size", "96", "--no-progress")


@pytest.mark.slow
def test_sigkill_then_rerun_is_byte_identical_to_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    assert main([SYNTHETIC[0], str(reference), *SYNTHETIC[1:]]) == 0

    out = tmp_path / "killed"
    process = clip_data(SYNTHETIC[0], out, *SYNTHETIC[1:])
    first = out / "train" / "shard-000000.tar"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the conversion finished before the kill"
    finished = tars(out / "train")
    assert "shard-000000.tar" in finished and len(finished) < 12
    assert not (out / "train" / "manifest.json").exists()
    stamps = {name: (out / "train" / name).stat().st_mtime_ns for name in finished}

    rerun = clip_data(SYNTHETIC[0], out, *SYNTHETIC[1:])
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "train: 2400 samples in 12 shards" in stdout
    assert tars(out / "train") == tars(reference / "train")
    assert {n: (out / "train" / n).stat().st_mtime_ns for n in finished} == stamps  # kept
    for name in ("sizes.json", "manifest.json"):
        assert (out / "train" / name).read_bytes() == (reference / "train" / name).read_bytes()
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    assert len(sizes) == 12 and set(sizes.values()) == {200}
    assert not [p for p in (out / "train").iterdir() if p.name.startswith(".")]


def test_two_worker_processes_on_a_converter_match_one(coco_fixture, tmp_path):
    captions, images, written, _ = coco_fixture
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        process = clip_data("coco", out, "--captions", captions, "--images", images,
                            "--samples-per-shard", "3", "--workers", workers)
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert "samples/s" in stderr or "sample/s" in stderr  # the progress bar
        runs[workers] = out
    assert tars(runs[1]) == tars(runs[2])
    assert json.loads((runs[2] / "manifest.json").read_text())["written"] == written


def test_bad_input_in_a_subprocess_is_one_line_without_traceback(tmp_path):
    process = clip_data("coco", tmp_path / "out", "--captions", tmp_path / "missing.json",
                        "--images", tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr == f"clip-data coco: error: {tmp_path / 'missing.json'} does not exist\n"


def test_help_lists_every_subcommand():
    process = clip_data("--help")
    stdout, _ = process.communicate(timeout=120)
    for command in ("synthetic", "coco", "karpathy", "csv", "folder", "laion", "verify"):
        assert command in stdout
