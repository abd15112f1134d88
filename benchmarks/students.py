"""What each student costs: parameters, MACs per image / per text, CPU pairs/s (fp32, eval mode),
all students measured in the same run with training/evaluation/cost.py (clip-eval --cost's
numbers). Results: the table in docs/students.md.

    .venv/bin/python benchmarks/students.py [--batch-size 8] [--iters 3] [--threads 1]
        [--students Mobile-CLIP ...] [--out students.json]

Students: the three systems of issue 11 (configs/students/*.json, configs/models/KDEOV-*.json)
and the TinyCLIP ViT and ResNet students of configs/models. Weights are random: cost does not
depend on them. pairs/s = 1 / (1/images_per_s + 1/texts_per_s), at full context length.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from training.evaluation.cost import model_cost  # noqa: E402
from training.specs import model_spec  # noqa: E402

STUDENTS = {
    "Mobile-CLIP": "two-tower:configs/students/Mobile-CLIP.json",
    "TinyCLIP-ConvFFN": "two-tower:configs/students/TinyCLIP-ConvFFN.json",
    "KDEOV-CSPDarknet-S": "configs/models/KDEOV-CSPDarknet-S.json",
    "TinyCLIP-ViT-8M-16-Text-3M": "TinyCLIP-ViT-8M-16-Text-3M",
    "TinyCLIP-ResNet-19M-Text-19M": "TinyCLIP-ResNet-19M-Text-19M",
}
HEADER = ("| student | image params | text params (no token emb.) | total params | image MMACs "
          "| text MMACs | CPU pairs/s |\n|---|---:|---:|---:|---:|---:|---:|\n")


def row(name: str, cost: dict) -> str:
    millions = lambda n: f"{n / 1e6:.1f}M"  # noqa: E731
    return (f"| {name} | {millions(cost['image_params'])} | "
            f"{millions(cost['text_params'])} ({millions(cost['text_params_no_token_embedding'])}) "
            f"| {millions(cost['total_params'])} | {cost['image_macs'] / 1e6:.0f} | "
            f"{cost['text_macs'] / 1e6:.0f} | {cost['pairs_per_s']:.1f} |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the JSON records here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(REPO)
    records, table = {}, HEADER
    for name in args.students:
        torch.manual_seed(0)
        model = model_spec(STUDENTS[name]).build().eval()
        records[name] = model_cost(model, args.batch_size, "fp32", warmup=1, iters=args.iters)
        table += row(name, records[name])
        print(table.splitlines()[-1], flush=True)
    print(f"\nfp32, batch {args.batch_size}, {args.threads} thread(s), {args.iters} timed "
          f"iterations after 1 warm-up\n\n{table}", end="")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
