"""`clip-data verify`: open every shard of a set, decode every sample, report counts, corrupt
samples (shard and key), caption lengths and image sizes, check sha256 against manifest.json,
and rebuild sizes.json. Works on our shard sets and on img2dataset's output alike."""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.errors import DataError
from data_tools.shards import MANIFEST_NAME, SIZES_NAME, sha256_file, write_sizes

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ShardReport:
    name: str
    samples: int = 0                      # keys seen
    valid: int = 0                        # samples that decode completely
    corrupt: list = field(default_factory=list)   # [{"key", "reason"}]
    caption_chars: list = field(default_factory=list)
    image_sizes: list = field(default_factory=list)  # [(width, height)]
    sha256: str = ""


def _check_member(ext: str, data: bytes, report: ShardReport) -> str | None:
    """Decode one tar member; return the reason it is corrupt, or None."""
    try:
        if ext in IMAGE_EXTS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                image.load()
            report.image_sizes.append(image.size)
        elif ext == "txt":
            report.caption_chars.append(len(data.decode("utf-8")))
        elif ext == "json":
            json.loads(data)
        elif ext == "cls":
            int(data.decode("ascii").strip())
    except Exception as e:  # noqa: BLE001 - any failure to decode is what we report
        return f"bad_{ext}: {type(e).__name__}: {str(e)[:120]}"
    return None


def _has_caption(members: dict[str, bytes]) -> bool:
    """What the trainer needs besides the image: a txt caption, json "captions", or (labelled
    evaluation sets) a cls label. Called once every member decoded."""
    if members.get("txt", b"").strip() or "cls" in members:
        return True
    meta = json.loads(members["json"]) if "json" in members else None
    return isinstance(meta, dict) and any(isinstance(c, str) and c.strip()
                                          for c in meta.get("captions") or [])


def verify_shard(path: Path) -> ShardReport:
    """Decode every member; a sample is valid when all its members decode and it has an
    image and a caption (or a class label). A tar that cannot be read to its end is reported
    under key "<tar>"."""
    report = ShardReport(Path(path).name)
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        report.corrupt.append({"key": "<tar>", "reason": f"unreadable_tar: {e}"})
    for key, members in samples.items():
        report.samples += 1
        reasons = [r for ext, data in sorted(members.items())
                   if (r := _check_member(ext, data, report))]
        if not any(ext in members for ext in IMAGE_EXTS):
            reasons.append("no_image")
        if not reasons and not _has_caption(members):
            reasons.append("no_caption")
        if reasons:
            report.corrupt.append({"key": key, "reason": "; ".join(reasons)})
        else:
            report.valid += 1
    report.sha256 = sha256_file(path)
    return report


def list_shards(folder: Path) -> list[Path]:
    """Every .tar in the folder, except links (clip_benchmark's 0.tar names our shards)."""
    return sorted(p for p in folder.glob("*.tar") if p.is_file() and not p.is_symlink())


def _stats(values) -> dict | None:
    if not len(values):
        return None
    array = np.asarray(values, dtype=float)
    return {"min": float(array.min()), "mean": round(float(array.mean()), 2),
            "max": float(array.max())}


def verify_folder(folder: Path, workers: int = 1, write_sizes_json: bool = True) -> dict:
    """The verify report of one shard set (and sizes.json rebuilt from its valid counts)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    shards = list_shards(folder)
    if not shards:
        splits = sorted(p for p in folder.iterdir() if p.is_dir() and list_shards(p))
        where = f"; its split folders hold them: verify {' '.join(map(str, splits))}" if splits else ""
        raise DataError(f"{folder} holds no .tar shards{where}")
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            reports = pool.map(verify_shard, shards)
    else:
        reports = [verify_shard(path) for path in shards]
    problems = _manifest_problems(folder, reports) + _sizes_problems(folder, reports)
    corrupt = [{"shard": r.name, **c} for r in reports for c in r.corrupt] + problems
    sizes = [s for r in reports for s in r.image_sizes]
    result = {
        "folder": str(folder),
        "shards": len(reports),
        "samples": sum(r.samples for r in reports),
        "valid": sum(r.valid for r in reports),
        "corrupt": corrupt,
        "caption_chars": _stats([c for r in reports for c in r.caption_chars]),
        "image_width": _stats([w for w, _ in sizes]),
        "image_height": _stats([h for _, h in sizes]),
        "per_shard": {r.name: {"samples": r.samples, "valid": r.valid} for r in reports},
    }
    if write_sizes_json:
        write_sizes(folder, {r.name: r.valid for r in reports})
    return result


def _manifest_problems(folder: Path, reports: list[ShardReport]) -> list[dict]:
    """Shards that differ from, or are missing against, the sha256 list of manifest.json."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return []
    try:
        listed = {s["name"]: s["sha256"] for s in json.loads(path.read_text())["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        return [{"shard": MANIFEST_NAME, "key": "-", "reason": f"unreadable_manifest: {e}"}]
    found = {r.name: r.sha256 for r in reports}
    problems = [{"shard": name, "key": "-", "reason": "missing_shard"}
                for name in listed if name not in found]
    problems += [{"shard": name, "key": "-", "reason": "sha256_mismatch"}
                 for name, digest in listed.items() if name in found and found[name] != digest]
    return problems


def _sizes_problems(folder: Path, reports: list[ShardReport]) -> list[dict]:
    """Shards whose sizes.json entry differs from their valid samples. Trainers plan epochs from
    sizes.json: a count too low silently shortens every epoch, one too high leaves it short."""
    path = folder / SIZES_NAME
    if not path.is_file():
        return []
    try:
        listed = json.loads(path.read_text())
        listed = {name: int(count) for name, count in listed.items()}
    except (ValueError, TypeError, AttributeError) as e:
        return [{"shard": SIZES_NAME, "key": "-", "reason": f"unreadable_sizes_json: {e}"}]
    return [{"shard": r.name, "key": "-",
             "reason": f"sizes_json_mismatch: sizes.json lists {listed.get(r.name, 'nothing')}, "
                       f"{r.valid} valid"}
            for r in reports if listed.get(r.name) != r.valid]


def format_report(report: dict, max_corrupt: int = 20) -> str:
    lines = [f"{report['folder']}: {report['shards']} shards, {report['samples']} samples, "
             f"{report['valid']} valid, {len(report['corrupt'])} corrupt"]
    for name, label in (("caption_chars", "caption length (chars)"),
                        ("image_width", "image width"), ("image_height", "image height")):
        if report[name]:
            s = report[name]
            lines.append(f"  {label}: min {s['min']:g} mean {s['mean']:g} max {s['max']:g}")
    for item in report["corrupt"][:max_corrupt]:
        lines.append(f"  CORRUPT {item['shard']} {item['key']}: {item['reason']}")
    if len(report["corrupt"]) > max_corrupt:
        lines.append(f"  ... and {len(report['corrupt']) - max_corrupt} more (see --json)")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify", help="decode every sample of shard sets, report, rebuild sizes.json")
    parser.add_argument("folders", type=Path, nargs="+", help="shard set folders")
    parser.add_argument("--report-only", action="store_true",
                        help="exit 0 even when corrupt samples are found")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--no-write-sizes", dest="write_sizes", action="store_false",
                        help="do not rebuild sizes.json")
    parser.add_argument("--workers", type=int, default=1, help="processes decoding shards")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reports = [verify_folder(folder, args.workers, args.write_sizes) for folder in args.folders]
    for report in reports:
        print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1) + "\n")
    corrupt = sum(len(r["corrupt"]) for r in reports)
    if corrupt and not args.report_only:
        print(f"verify: {corrupt} corrupt samples or shards (exit 1; --report-only to accept)")
        return 1
    return 0
