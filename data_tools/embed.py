"""`clip-data embed`: store teachers' embeddings beside a shard set, so training runs no teacher.

    clip-data embed 'DIR/shard-{000000..000099}.tar' --name b32 \
        --teacher ViT-B-32 --pretrained vit_b32.safetensors --augmentations 5 --dtype fp16
    torchrun --nproc_per_node 8 -m data_tools embed ...      # each rank a slice of the shards

For every usable sample of every shard (ours or img2dataset's, read as they are) it draws N crop
boxes (the training crop: views.crop_box, seeded by (seed, shard, key)), computes each teacher's
image embedding of each crop (the teacher's own view: views.PairedViews) and text embedding of
every caption, and writes DIR/NAME/<shard name> with the same keys (format: training/data/
sidecar.py, docs/data.md), then manifest.json (teacher identities, N, dtype, seed, per-shard
sha256 and the image shard's size) and sizes.json. The images are never rewritten.

Like the converters (data_tools/shards.py): each sidecar shard is written to a hidden partial file
and renamed when complete, with a `.progress/` record first, so a rerun resumes at shard
granularity to byte-identical files; a folder holding another plan (other teachers, N, dtype,
seed, shards) is refused in one line unless --overwrite. Under torchrun rank r embeds shards
r::world_size; the shard's content does not depend on the split, and rank 0 writes the manifest
once every rank is done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import braceexpand
from tqdm import tqdm

from data_tools import __version__
from data_tools.errors import DataError
from data_tools.shards import (MANIFEST_NAME, PROGRESS_DIR, SIZES_NAME, ensure_writable_dir,
                               finished_records, plain_name, write_manifest, write_sizes)

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = ("fp32", "fp16", "bf16")  # training/data/sidecar.py's
FORMAT = 1  # training/data/sidecar.py's
CROP = {"scale": [0.9, 1.0], "ratio": [3 / 4, 4 / 3]}  # training/data/views.py's, checked in run


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed", help="store teachers' embeddings of N augmentations beside a shard set",
        description="Compute teacher image embeddings of N stored augmentations per image and "
                    "text embeddings of every caption; write them as sidecar shards in "
                    "SHARD_FOLDER/NAME/ (docs/data.md).")
    parser.add_argument("shards", help="image shards: local tar files in one folder, brace "
                                       "pattern, e.g. 'DIR/shard-{000000..000099}.tar'")
    parser.add_argument("--name", required=True, help="the set's folder beside the shards "
                                                      "(training: model.teacher_embeddings)")
    parser.add_argument("--teacher", action="append", required=True,
                        help="teacher model (open_clip name, JSON config, any spec the trainer "
                             "accepts); repeat for an ensemble")
    parser.add_argument("--pretrained", action="append",
                        help="the teacher's weights (state-dict file or open_clip tag), one per "
                             "--teacher in order ('none': random weights)")
    parser.add_argument("--augmentations", type=int, default=5, help="crops per image (N)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="stored embedding dtype")
    parser.add_argument("--seed", type=int, default=0, help="seeds the stored crops")
    parser.add_argument("--batch-size", type=int, default=256, help="images per teacher forward")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the teachers' compute dtype (fp16 needs a GPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when "
                                                       "available, LOCAL_RANK's GPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a set of the same name written with other arguments")
    parser.add_argument("--timeout-s", type=int, default=3600,
                        help="how long ranks wait for each other under torchrun")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------- inputs

def shard_paths(spec: str) -> list[Path]:
    paths = [Path(p) for p in braceexpand.braceexpand(spec)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"shard not found: {missing[0]} ({len(missing)} of {len(paths)} missing)")
    if len({p.parent.resolve() for p in paths}) != 1:
        raise DataError(f"{spec}: the shards must be in one folder (run embed once per folder)")
    if len({p.name for p in paths}) != len(paths):
        raise DataError(f"{spec}: names a shard twice")
    return paths


def check_args(args: argparse.Namespace) -> list[str | None]:
    """The --pretrained per --teacher; one-line DataError for bad options."""
    plain_name(args.name, "--name")
    for option, value in (("--augmentations", args.augmentations),
                          ("--batch-size", args.batch_size)):
        if value < 1:
            raise DataError(f"{option} must be at least 1, got {value}")
    pretrained = args.pretrained or [None] * len(args.teacher)
    if len(pretrained) != len(args.teacher):
        raise DataError(f"{len(args.teacher)} --teacher but {len(pretrained)} --pretrained: give "
                        f"one --pretrained per teacher ('none' for random weights)")
    pretrained = [None if p in (None, "none") else p for p in pretrained]
    for p in pretrained:
        if p is not None and Path(p).suffix and not Path(p).is_file():
            raise DataError(f"--pretrained {p}: file not found")
    return pretrained


# --------------------------------------------------------------------------- the run

def _rank_world() -> tuple[int, int, int]:
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _agree(world: int, error: str | None) -> None:
    """All ranks meet here; if any had a one-line error, every rank raises the first one."""
    errors = [error]
    if world > 1:
        import torch.distributed as dist
        errors = [None] * world
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise DataError(first)


def _device(requested: str | None, local_rank: int):
    import torch
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def plan_fingerprint(teachers: list[dict], shards: list[Path], args) -> str:
    identity = {"version": __version__, "format": FORMAT, "teachers": teachers,
                "augmentations": args.augmentations, "dtype": args.dtype, "seed": args.seed,
                "batch_size": args.batch_size, "crop": CROP,
                "shards": {p.name: p.stat().st_size for p in shards}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def run(args: argparse.Namespace) -> int:
    pretrained = check_args(args)
    shards = shard_paths(args.shards)
    rank, world, local_rank = _rank_world()
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    try:
        return _run(args, pretrained, shards, rank, world, local_rank)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(args, pretrained, shards, rank, world, local_rank) -> int:
    from data_tools.embedding import ShardEmbedder, Teacher  # torch: only when embedding
    device = _device(args.device, local_rank)
    if args.precision == "fp16" and device.type != "cuda":
        raise DataError("--precision fp16 needs a GPU; use bf16 or fp32")
    teachers = [Teacher(m, p, args.precision, device) for m, p in zip(args.teacher, pretrained)]
    identities = [t.identity for t in teachers]
    out_dir = shards[0].parent / args.name
    fingerprint = plan_fingerprint(identities, shards, args)
    names = [p.name for p in shards]

    def clear():
        for path in out_dir.glob("*.tar"):
            path.unlink()
        for name in (MANIFEST_NAME, SIZES_NAME):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)

    error = None
    if rank == 0:  # one rank checks (and with --overwrite clears) the folder
        try:
            ensure_writable_dir(out_dir)
            finished_records(out_dir, fingerprint, names, overwrite=args.overwrite, clear=clear)
        except DataError as err:
            error = (f"{err}" if "different arguments" not in str(err) else
                     f"{out_dir} holds embeddings of other teachers or settings (never mixed in "
                     f"one set); use another --name or pass --overwrite")
    _agree(world, error)
    mine = shards[rank::world]
    done = finished_records(out_dir, fingerprint, [p.name for p in mine], overwrite=False,
                            clear=clear)
    todo = [p for p in mine if p.name not in done]
    for shard in todo:
        (out_dir / f".{shard.name}.partial").unlink(missing_ok=True)
    embedder = ShardEmbedder(out_dir, teachers, augmentations=args.augmentations,
                             dtype=args.dtype, seed=args.seed, batch_size=args.batch_size,
                             fingerprint=fingerprint)
    error, samples, start, cpu_start = None, 0, time.perf_counter(), time.process_time()
    with tqdm(unit="sample", smoothing=0.1, disable=not args.progress or rank != 0,
              desc=f"embed -> {args.name} (rank 0 of {world})", dynamic_ncols=True) as bar:
        try:
            for shard in todo:
                samples += embedder.write(shard, bar.update).count
        except DataError as err:
            error = str(err)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if rank == 0 and todo:  # benchmarks/stored_embeddings.py reads this line
        print(f"embedded {samples} samples in {wall:.2f} s ({samples / max(wall, 1e-9):.1f} "
              f"samples/s on rank 0; process CPU {cpu:.2f} s)", flush=True)
    _agree(world, error)
    if rank == 0:
        write_set_files(out_dir, shards, fingerprint, identities, args)
    return 0


def write_set_files(out_dir: Path, shards: list[Path], fingerprint: str, identities: list[dict],
                    args) -> dict:
    """sizes.json and manifest.json of the finished set (rank 0, after every rank is done)."""
    done = finished_records(out_dir, fingerprint, [p.name for p in shards], overwrite=False,
                            clear=None)
    missing = [p.name for p in shards if p.name not in done]
    if missing:
        raise DataError(f"{out_dir}: sidecar shard {missing[0]} is missing after the run")
    records = [done[p.name] for p in shards]
    write_sizes(out_dir, {r.name: r.count for r in records})
    info = {"format": FORMAT, "augmentations": args.augmentations, "dtype": args.dtype,
            "seed": args.seed, "crop": CROP,
            "teachers": identities,
            "source": str(shards[0].parent.resolve()),
            "source_bytes": {p.name: p.stat().st_size for p in shards}}
    arguments = {"shards": args.shards, "teacher": args.teacher, "pretrained": args.pretrained,
                 "augmentations": args.augmentations, "dtype": args.dtype, "seed": args.seed,
                 "batch_size": args.batch_size, "precision": args.precision}
    manifest = write_manifest(out_dir, source="embed", arguments=arguments, records=records,
                              plan=fingerprint, extra={"embeddings": info})
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    return manifest
