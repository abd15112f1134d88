"""Shard-writing speed: our writer (ShardSetWriter + images.prepare_image, what every converter
runs) against img2dataset's resize + encode of the same images, served by a local HTTP server,
with 1 and 2 worker processes, in the same run. Output 256 px (shorter side), JPEG quality 95
for both; sources are 512-640 px JPEGs generated here.

    .venv/bin/python benchmarks/shard_writing.py [--images 400] [--repeats 3]

Three measurements per tool. "per image": decode + resize + encode of each image on one
thread, the two tools alternating in this process. "wall": the whole call, process start-up
included (what a user waits for). "in shards": start-up left out (img2dataset: first shard
start to last shard end from its NNNNN_stats.json; ours: write_shard in a pool whose workers
have already started). "ours + read-ahead" measures a candidate change to shards.py
(ReadAheadSource below). Ratios ours / img2dataset > 1 mean we are faster. Results and the
command: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from data_tools.images import ImageOptions, prepare_image  # noqa: E402
from data_tools.shards import ShardSetWriter, write_shard  # noqa: E402
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


class ReadAheadSource:
    """A candidate change to data_tools/shards.py (write_shard), measured here and NOT adopted
    (docs/benchmarks.md: no gain, often a loss, on 2 cores): while the writer takes item i,
    the next items of the same shard are prepared on `threads` threads (Pillow releases the GIL
    in decode, resize and encode, as cv2 does for img2dataset's download threads). Items still
    arrive in order, so the shards would be unchanged."""

    def __init__(self, source, threads: int, samples_per_shard: int):
        self.source, self.threads, self.samples_per_shard = source, threads, samples_per_shard
        self._pool, self._futures = None, {}

    def __getstate__(self):  # thread pools do not pickle: each worker process makes its own
        return {**self.__dict__, "_pool": None, "_futures": {}}

    def __len__(self) -> int:
        return len(self.source)

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def sample(self, index: int) -> dict[str, bytes]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)
        shard_end = (index // self.samples_per_shard + 1) * self.samples_per_shard
        for ahead in range(index, min(index + 2 * self.threads, shard_end, len(self.source))):
            if ahead not in self._futures:
                self._futures[ahead] = self._pool.submit(self.source.sample, ahead)
        return self._futures.pop(index).result()  # re-raises the item's Skip


def make_sources(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(512, 641, size=2))
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(make_image_bytes(width, height, seed=i))
        paths.append(path)
    return paths


def time_ours(paths: list[Path], out: Path, workers: int, per_shard: int,
              threads: int = 0) -> float:
    """Wall time of the public writer; threads > 0 wraps the source in ReadAheadSource."""
    shutil.rmtree(out, ignore_errors=True)
    writer = ShardSetWriter(out, source="benchmark", arguments={}, samples_per_shard=per_shard,
                            workers=workers, progress=False)
    source = ImageFileSource(tuple(map(str, paths)))
    if threads:
        source = ReadAheadSource(source, threads, per_shard)
    start = time.perf_counter()
    manifest = writer.write(source)
    wall = time.perf_counter() - start
    assert manifest["written"] == len(paths), manifest["skipped"]
    return wall


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


def time_ours_in_shards(paths: list[Path], out: Path, workers: int, per_shard: int,
                        threads: int = 0) -> float:
    """Our shard writing without process start-up: write_shard for every shard in a pool
    whose workers have already imported and warmed up (img2dataset's "in shards" time also
    starts after its workers' start-up)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    writer = ShardSetWriter(out, source="benchmark", arguments={}, samples_per_shard=per_shard,
                            workers=workers, progress=False)
    source = ImageFileSource(tuple(map(str, paths)))
    if threads:
        source = ReadAheadSource(source, threads, per_shard)
    plan = writer.plan(len(source))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_warm_up, range(workers))
        start = time.perf_counter()
        records = pool.starmap(write_shard, [(source, plan, s) for s in range(plan.num_shards)])
        elapsed = time.perf_counter() - start
    assert sum(r.count for r in records) == len(paths)
    return elapsed


def _warm_up(_: int) -> None:
    prepare_image(make_image_bytes(600, 520, seed=0), ImageOptions(max_size=OUTPUT_SIZE))


def time_per_image(paths: list[Path]) -> dict[str, float]:
    """The image work alone, one thread, in this process: our prepare_image against
    img2dataset's Resizer (cv2 decode, albumentations SmallestMaxSize with INTER_AREA, cv2
    encode) on the same bytes, alternating image by image so that load changes hit both."""
    from img2dataset.resizer import Resizer

    resizer = Resizer(image_size=OUTPUT_SIZE, resize_mode="keep_ratio",
                      resize_only_if_bigger=True, encode_quality=QUALITY)
    options = ImageOptions(max_size=OUTPUT_SIZE, quality=QUALITY)
    seconds = {"ours per image": 0.0, "img2dataset per image": 0.0}
    for path in paths:
        data = path.read_bytes()
        start = time.perf_counter()
        prepare_image(data, options)
        middle = time.perf_counter()
        assert resizer(io.BytesIO(data))[-1] is None
        seconds["ours per image"] += middle - start
        seconds["img2dataset per image"] += time.perf_counter() - middle
    return seconds


COLUMNS = ("ours per image", "img2dataset per image", "ours wall", "img2dataset wall",
           "ours in shards", "ours + read-ahead in shards", "img2dataset in shards")


def measure_once(paths, urls, work: Path, workers: int, per_shard: int,
                 threads: int) -> dict[str, float]:
    """Seconds for each column, all measured back to back."""
    seconds = {**time_per_image(paths),
               "ours wall": time_ours(paths, work / "ours", workers, per_shard),
               "ours in shards": time_ours_in_shards(paths, work / "ours", workers, per_shard),
               "ours + read-ahead in shards": time_ours_in_shards(paths, work / "ours", workers,
                                                                  per_shard, threads)}
    theirs = time_img2dataset(urls, work, work / "img2dataset", workers, per_shard)
    seconds.update({"img2dataset wall": theirs["wall"],
                    "img2dataset in shards": theirs["in_shards"]})
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4, help="read-ahead threads per worker")
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        work = Path(tmp)
        (work / "src").mkdir()
        paths = make_sources(work / "src", args.images)
        routes = {f"/{p.name}": Route(body=p.read_bytes()) for p in paths}
        megapixels = np.mean([np.prod(_jpeg_size(p)) for p in paths]) / 1e6
        print(f"{args.images} JPEGs 512-640 px (mean {megapixels:.2f} MP) -> {OUTPUT_SIZE} px "
              f"JPEG q{QUALITY}, {args.per_shard} per shard, {args.repeats} runs, read-ahead "
              f"{args.threads} threads, img2dataset 16 threads per process; "
              f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}", flush=True)
        runs = {}
        with ImageServer(routes) as server:
            urls = [server.url(f"/{p.name}") for p in paths]
            for workers in (1, 2):
                runs[workers] = [measure_once(paths, urls, work, workers, args.per_shard,
                                              args.threads) for _ in range(args.repeats)]
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print_table(runs, args.images)


RATIOS = {"per image": ("ours per image", "img2dataset per image"),
          "wall": ("ours wall", "img2dataset wall"),
          "in shards": ("ours in shards", "img2dataset in shards"),
          "read-ahead in shards": ("ours + read-ahead in shards", "img2dataset in shards")}


def print_table(runs: dict[int, list[dict[str, float]]], images: int) -> None:
    """Median samples/s per measurement, and ratios ours / img2dataset (> 1: we are faster):
    the median of the per-run ratios, each run's two sides measured back to back."""
    print("\n| workers | " + " | ".join(COLUMNS) + " | " +
          " | ".join(f"ratio {name}" for name in RATIOS) + " |")
    print("|---" * (1 + len(COLUMNS) + len(RATIOS)) + "|")
    for workers, results in runs.items():
        rates = [f"{statistics.median(images / r[c] for r in results):.0f}" for c in COLUMNS]
        ratios = []
        for ours, theirs in RATIOS.values():
            per_run = [r[theirs] / r[ours] for r in results]
            ratios.append(f"{statistics.median(per_run):.2f} "
                          f"({', '.join(f'{x:.2f}' for x in per_run)})")
        print(f"| {workers} | " + " | ".join(rates + ratios) + " |")


def _jpeg_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


if __name__ == "__main__":
    main()
