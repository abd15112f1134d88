"""Training-loader speed from object storage: the same shards read by `build_train_loader` from
local files and from a local S3 server (moto in its own process, tests/helpers/s3.py), with 1 and
2 workers, with and without read-ahead, and with an added first-byte latency per shard GET (a
remote store's round trip, which a server on the loopback does not have). Every configuration runs
once per repeat, all alternating in the same run; the table gives the median samples/s and the
median over repeats of the ratio to local files with the same worker count in the same repeat
(robust to a machine whose load changes between repeats). Results: docs/benchmarks.md ("Data: object
storage").

    .venv/bin/python benchmarks/s3_loader.py [--samples 2048] [--shards 16] [--image-size 64]
        [--batch-size 64] [--latency-ms 50] [--repeats 3]

Small images on purpose: at 64 px decoding is cheap, so what the storage path costs shows.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402

from tests.helpers.s3 import S3Server, s3_filesystem, upload_folder  # noqa: E402
from tests.helpers.shards import make_synthetic_shards  # noqa: E402
from training.data import DataConfig, build_train_loader  # noqa: E402


def rate(spec: str, args, workers: int, read_ahead: int, tokenizer) -> tuple[float, int]:
    preprocess = {"size": args.image_size, "mean": open_clip.OPENAI_DATASET_MEAN,
                  "std": open_clip.OPENAI_DATASET_STD}
    cfg = DataConfig(train=spec, batch_size=args.batch_size, workers=workers, shuffle_buffer=256,
                     read_ahead=read_ahead)
    loader = build_train_loader(cfg, seed=0, student_preprocess=preprocess, teacher_preprocess=None,
                                tokenizer=tokenizer, rank=0, world_size=1, epoch=0)
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += len(batch["key"])
    return samples / (time.perf_counter() - start), loader.stats()["read_retries"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3:
        os.environ.update(s3.env)
        shards = make_synthetic_shards(tmp, train=args.samples, val=0, zeroshot=0,
                                       samples_per_shard=args.samples // args.shards,
                                       image_size=args.image_size)
        fs = s3_filesystem()
        fs.mkdir("bench")
        upload_folder(fs, shards["train"], "s3://bench/train")
        pattern = shards["train_shards"].rsplit("/", 1)[1]
        remote = f"s3://bench/train/{pattern}"
        configs = [(f"local files, {w} worker(s)", shards["train_shards"], w, 0, 0) for w in (1, 2)]
        configs += [(f"s3{' +%g ms' % args.latency_ms if lat else ''}, {w} worker(s), read-ahead {ra}",
                     remote, w, ra, lat)
                    for lat in (0, args.latency_ms) for w in (1, 2) for ra in (0, 1, 2)]
        results: dict[str, list[float]] = {name: [] for name, *_ in configs}
        for _ in range(args.repeats):
            for name, spec, workers, read_ahead, latency in configs:
                s3.faults(stall_every=1 if latency else 0, stall_s=latency / 1000)
                samples_per_s, retries = rate(spec, args, workers, read_ahead, tokenizer)
                assert retries == 0, f"{name}: {retries} retries"
                results[name].append(samples_per_s)
    print(f"{args.samples} samples in {args.shards} shards, {args.image_size} px, batch "
          f"{args.batch_size}, {args.repeats} repeats; samples/s (median) and the median over repeats of "
          f"the ratio to local files with the same workers in the same repeat")
    for name, spec, workers, *_ in configs:
        local = results[f"local files, {workers} worker(s)"]
        ratios = [a / b for a, b in zip(results[name], local)]
        runs = ", ".join(f"{v:.0f}" for v in results[name])
        print(f"  {name:42s} {statistics.median(results[name]):7.0f}   {statistics.median(ratios):5.2f}"
              f"   (runs: {runs})")


if __name__ == "__main__":
    main()
