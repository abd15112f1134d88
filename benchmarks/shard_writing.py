"""Shard-writing speed: our writer (ShardSetWriter + images.prepare_image, what every converter
runs) against img2dataset's resize + encode of the same images, served by a local HTTP server,
with 1 and 2 worker processes, in the same run. Output 256 px (shorter side), JPEG quality 95
for both; sources are 512-640 px JPEGs generated here.

    .venv/bin/python benchmarks/shard_writing.py [--images 400] [--repeats 2]

Two rates per tool: "wall" is the whole call (process start-up included), "in shards" is
images / (last shard end - first shard start), which leaves out start-up (img2dataset's
per-shard start/end times come from its NNNNN_stats.json; ours from the writer's timing of the
pool). The ratio ours / img2dataset > 1 means we are faster. Results: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from data_tools.images import ImageOptions, prepare_image  # noqa: E402
from data_tools.shards import ShardSetWriter  # noqa: E402
from tests.helpers.http_server import ImageServer, Route, make_image_bytes  # noqa: E402

OUTPUT_SIZE = 256
QUALITY = 95


@dataclass(frozen=True)
class ImageFileSource:
    """Item i: image file i re-encoded (shorter side to 256) + its caption, like a converter."""

    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def sample(self, index: int) -> dict[str, bytes]:
        data = Path(self.paths[index]).read_bytes()
        image = prepare_image(data, ImageOptions(max_size=OUTPUT_SIZE, quality=QUALITY))
        meta = {"width": image.width, "height": image.height,
                "original_width": image.original_width, "original_height": image.original_height}
        return {image.ext: image.data, "txt": f"image {index}".encode(),
                "json": json.dumps(meta).encode()}


def make_sources(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(512, 641, size=2))
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(make_image_bytes(width, height, seed=i))
        paths.append(path)
    return paths


def time_ours(paths: list[Path], out: Path, workers: int, per_shard: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    writer = ShardSetWriter(out, source="benchmark", arguments={}, samples_per_shard=per_shard,
                            workers=workers, progress=False)
    start = time.perf_counter()
    manifest = writer.write(ImageFileSource(tuple(map(str, paths))))
    wall = time.perf_counter() - start
    assert manifest["written"] == len(paths), manifest["skipped"]
    return {"wall": wall}


def time_img2dataset(urls: list[str], work: Path, out: Path, workers: int,
                     per_shard: int) -> dict:
    import img2dataset

    shutil.rmtree(out, ignore_errors=True)
    url_list = work / "urls.parquet"
    pd.DataFrame({"url": urls, "caption": [f"image {i}" for i in range(len(urls))]}).to_parquet(
        url_list)
    start = time.perf_counter()
    img2dataset.download(url_list=str(url_list), output_folder=str(out), input_format="parquet",
                         url_col="url", caption_col="caption", output_format="webdataset",
                         image_size=OUTPUT_SIZE, resize_mode="keep_ratio",
                         resize_only_if_bigger=True, encode_quality=QUALITY,
                         processes_count=workers, thread_count=16,
                         number_sample_per_shard=per_shard, timeout=30, enable_wandb=False)
    wall = time.perf_counter() - start
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    assert sum(s["successes"] for s in stats) == len(urls), stats
    in_shards = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {"wall": wall, "in_shards": in_shards}


def time_ours_in_shards(paths: list[Path], out: Path, workers: int, per_shard: int) -> float:
    """Our writer's time without process start-up: the same write with the pool already
    warm is not available through the public API, so time shard writing directly in worker
    processes started beforehand (see _shard_worker)."""
    import multiprocessing

    from data_tools.shards import write_shard

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    writer = ShardSetWriter(out, source="benchmark", arguments={}, samples_per_shard=per_shard,
                            workers=workers, progress=False)
    source = ImageFileSource(tuple(map(str, paths)))
    plan = writer.plan(len(source))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pool.map(_warm_up, range(workers))  # imports done before the clock starts
        start = time.perf_counter()
        pool.starmap(write_shard, [(source, plan, s) for s in range(plan.num_shards)])
        return time.perf_counter() - start


def _warm_up(_: int) -> None:
    prepare_image(make_image_bytes(600, 520, seed=0), ImageOptions(max_size=OUTPUT_SIZE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        work = Path(tmp)
        (work / "src").mkdir()
        paths = make_sources(work / "src", args.images)
        routes = {f"/{p.name}": Route(body=p.read_bytes()) for p in paths}
        megapixels = np.mean([np.prod(_jpeg_size(p)) for p in paths]) / 1e6
        print(f"{args.images} JPEGs 512-640 px (mean {megapixels:.2f} MP) -> {OUTPUT_SIZE} px, "
              f"{args.per_shard} per shard, best of {args.repeats}; cpu count {os.cpu_count()}")
        rows = []
        with ImageServer(routes) as server:
            urls = [server.url(f"/{p.name}") for p in paths]
            for workers in (1, 2):
                ours, ours_shards, theirs, theirs_shards = [], [], [], []
                for _ in range(args.repeats):  # interleaved, so that load changes hit both
                    ours.append(time_ours(paths, work / "ours", workers, args.per_shard)["wall"])
                    ours_shards.append(time_ours_in_shards(paths, work / "ours_shards", workers,
                                                           args.per_shard))
                    result = time_img2dataset(urls, work, work / "i2d", workers, args.per_shard)
                    theirs.append(result["wall"])
                    theirs_shards.append(result["in_shards"])
                n = args.images
                rows.append((workers, n / min(ours), n / min(theirs), min(theirs) / min(ours),
                             n / min(ours_shards), n / min(theirs_shards),
                             min(theirs_shards) / min(ours_shards)))
    print("\n| workers | ours wall (samples/s) | img2dataset wall | ratio | ours in shards | "
          "img2dataset in shards | ratio |")
    print("|---|---|---|---|---|---|---|")
    for w, a, b, r, c, d, r2 in rows:
        print(f"| {w} | {a:.0f} | {b:.0f} | {r:.2f} | {c:.0f} | {d:.0f} | {r2:.2f} |")


def _jpeg_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


if __name__ == "__main__":
    main()
