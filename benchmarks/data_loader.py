"""Training-loader speed: our loader (training.data.build_train_loader) against OpenCLIP's own
(open_clip_train.data.get_wds_dataset) on the same shards, same batch size, same worker count and
the same train transform (RandomResizedCrop scale 0.9-1.0 bicubic + normalise), measured in the
same run, alternating, as samples/s over whole epochs (median of the repeats, and the ratio of each adjacent pair). Results: docs/benchmarks.md.

    .venv/bin/python benchmarks/data_loader.py [--samples 1024] [--image-size 256] [--crop 224]
        [--batch-size 64] [--workers 1] [--repeats 5]

Ours does more per sample (header check, seeded per-sample RNG, paired views, corrupt accounting);
the ratio ours / open_clip > 1 means ours is faster.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402
import open_clip_train.data as openclip_data  # noqa: E402

from tests.helpers.shards import make_synthetic_shards  # noqa: E402
from training.data import DataConfig, build_train_loader  # noqa: E402


def rate(loader) -> float:
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += len(batch["key"]) if isinstance(batch, dict) else len(batch[0])
    return samples / (time.perf_counter() - start)


def ours(shards: dict, args, tokenizer) -> float:
    preprocess = {"size": args.crop, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    cfg = DataConfig(train=shards["train_shards"], batch_size=args.batch_size,
                     workers=args.workers, shuffle_buffer=1000)
    return rate(build_train_loader(cfg, seed=0, student_preprocess=preprocess, teacher_preprocess=preprocess,
                                   tokenizer=tokenizer, rank=0, world_size=1, epoch=0))


def openclip(shards: dict, args, tokenizer) -> float:
    namespace = SimpleNamespace(train_data=shards["train_shards"], train_num_samples=shards["train_count"],
                                dataset_resampled=False, train_data_upsampling_factors=None, seed=0,
                                batch_size=args.batch_size, workers=args.workers, world_size=1)
    transform = open_clip.image_transform(args.crop, is_train=True)
    info = openclip_data.get_wds_dataset(namespace, transform, is_train=True, epoch=0, floor=True,
                                         tokenizer=tokenizer)
    return rate(info.dataloader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_synthetic_shards(tmp, train=args.samples, val=0, zeroshot=0,
                                       samples_per_shard=args.samples // 8, image_size=args.image_size)
        results = {"ours": [], "open_clip": []}
        for _ in range(args.repeats):
            results["ours"].append(ours(shards, args, tokenizer))
            results["open_clip"].append(openclip(shards, args, tokenizer))
    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"{args.samples} samples, {args.image_size} px -> {args.crop}, batch {args.batch_size}, "
          f"workers {args.workers}, median of {args.repeats}")
    for name, values in results.items():
        print(f"  {name:10s} {median[name]:7.0f} samples/s   (runs: {', '.join(f'{v:.0f}' for v in values)})")
    ratios = [a / b for a, b in zip(results["ours"], results["open_clip"])]
    print(f"  ratio ours / open_clip: {median['ours'] / median['open_clip']:.2f} "
          f"(per adjacent pair: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
