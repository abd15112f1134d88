"""`clip-eval` (also `python -m training.evaluation`): evaluate a checkpoint, or report on runs.

  clip-eval eval --checkpoint PATH [--model NAME_OR_JSON] [--zeroshot DIR] [--retrieval DIR]
                 [--cost] [--out record.json]     # JSON record + model-zoo markdown row
  clip-eval report RUN_DIR [RUN_DIR ...] --out DIR [--labels A B ...]
  clip-eval latency [--checkpoint PATH] [--model NAME_OR_JSON] [--backends pytorch,onnx,int8]
                    [--batch-size 64] [--out latency.json]   # per-tower ms and pairs/s
  clip-eval attribution --checkpoint S [--model M] --teacher-checkpoint T [--teacher-model M]
                        --images DIR [--texts T ...] [--num-images 4] --out DIR
                        # teacher | student heatmaps (PNG) + map agreement (attribution.json)

Under torchrun the evaluation runs on every rank (each encodes its share; results gathered);
rank 0 prints and writes. Bad input ends with one line `clip-eval: error: ...` and exit 2,
before any model is built or image read.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from training.evaluation.features import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-eval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="zero-shot, retrieval and model cost of one model")
    ev.add_argument("--checkpoint", help="export folder, run dir, DeepSpeed tag folder or "
                    "state-dict file (omit for random weights)")
    ev.add_argument("--model", help="open_clip model name or JSON model config (needed for a "
                    "state-dict file; read from config.yaml for a run dir)")
    ev.add_argument("--zeroshot", metavar="DIR", help="labelled shards or ImageFolder tree")
    ev.add_argument("--classnames", help="'imagenet' or a file (default: DIR/classnames.txt)")
    ev.add_argument("--templates", help="'openai' (80), 'simple' (7) or a file (default: "
                    "DIR/zeroshot_classification_templates.txt, else 'a photo of a {c}.')")
    ev.add_argument("--retrieval", metavar="DIR", help="captioned test shards (json captions)")
    ev.add_argument("--cost", action="store_true", help="parameters, MACs and throughput")
    ev.add_argument("--cost-batch-size", type=int, default=64, help="throughput batch size")
    ev.add_argument("--cost-iters", type=int, default=10, help="timed throughput iterations")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--workers", type=int, default=0, help="loader workers per rank")
    ev.add_argument("--max-samples", type=int, help="first N samples of each set only")
    ev.add_argument("--precision", choices=PRECISIONS, default="fp32")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ev.add_argument("--out", help="write the JSON record here (and the .md row beside it)")

    rep = sub.add_parser("report", help="PNG curves and evaluation table of runs")
    rep.add_argument("run_dirs", nargs="+", help="run directories (or metrics.jsonl files)")
    rep.add_argument("--out", required=True, help="output folder")
    rep.add_argument("--labels", nargs="+", help="one legend label per run")

    lat = sub.add_parser("latency", help="per-tower latency and pairs/s per backend "
                         "(PyTorch eager, ONNX Runtime fp32 and int8): training/deploy/latency.py")
    lat.add_argument("--checkpoint", help="as for eval (omit for random weights)")
    lat.add_argument("--model", help="as for eval")
    lat.add_argument("--backends", default="pytorch,onnx,int8",
                     help="comma-separated subset of pytorch,onnx,int8")
    lat.add_argument("--batch-size", type=int, default=64, help="throughput batch size")
    lat.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
    lat.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    lat.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    lat.add_argument("--device", default="cpu", help="PyTorch eager's device (cpu or cuda)")
    lat.add_argument("--out", help="write the JSON rows here (and the .md table beside it)")

    att = sub.add_parser("attribution", help="side-by-side teacher | student attribution "
                         "heatmaps and a map-agreement score: training/evaluation/attribution.py")
    att.add_argument("--checkpoint", help="the student, as for eval (omit for random weights)")
    att.add_argument("--model", help="as for eval")
    att.add_argument("--teacher-checkpoint", help="the teacher, as --checkpoint")
    att.add_argument("--teacher-model", help="the teacher's model, as --model")
    att.add_argument("--images", required=True, metavar="DIR", help="an evaluation set (shards "
                     "or ImageFolder); its first --num-images images are used")
    att.add_argument("--texts", nargs="+", help="texts to explain (each image with each text; "
                     "default: each image's first caption)")
    att.add_argument("--num-images", type=int, default=4)
    att.add_argument("--top-fraction", type=float, default=0.1,
                     help="share of the patches whose top-k IoU is reported")
    att.add_argument("--device", default="cpu")
    att.add_argument("--out", required=True, help="output folder (PNGs + attribution.json)")
    return parser


def run_attribution(args) -> None:
    from training.evaluation.attribution import write_attribution
    from training.evaluation.datasets import open_eval_set
    from training.evaluation.loading import load_for_eval

    if args.teacher_checkpoint is None and args.teacher_model is None:
        raise ValueError("attribution needs a teacher: --teacher-checkpoint and/or --teacher-model")
    if args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images}: must be positive")
    if not 0 < args.top_fraction <= 1:
        raise ValueError(f"--top-fraction {args.top_fraction}: must be in (0, 1]")
    if args.texts is not None and not all(t.strip() for t in args.texts):
        raise ValueError("--texts: an empty text")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    open_eval_set(args.images)
    student = load_for_eval(args.checkpoint, args.model, args.device)
    teacher = load_for_eval(args.teacher_checkpoint, args.teacher_model, args.device)
    record = write_attribution(student, teacher, args.images, args.out, args.num_images,
                               args.texts, args.top_fraction, args.device)
    print(json.dumps({k: v for k, v in record.items() if k != "pairs"}, indent=2))


def run_latency(args) -> None:
    from training.deploy.latency import BACKENDS, LATENCY_HEADER, latency_row, measure
    from training.evaluation.loading import load_for_eval

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or set(backends) - set(BACKENDS):
        raise ValueError(f"--backends {args.backends!r}: expected a subset of {','.join(BACKENDS)}")
    for name in ("batch_size", "iters", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here")
    rows = measure(load_for_eval(args.checkpoint, args.model), backends, args.batch_size,
                   args.warmup, args.iters, args.threads, args.device)
    table = LATENCY_HEADER + "".join(map(latency_row, rows))
    print(json.dumps(rows, indent=2))
    print(table, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(table)


def _check_eval_args(args) -> None:
    """Everything that can be checked before a model is built or an image read."""
    from training.evaluation.datasets import open_eval_set
    from training.evaluation.zeroshot import resolve_classnames, resolve_templates

    if not (args.zeroshot or args.retrieval or args.cost):
        raise ValueError("nothing to do: give --zeroshot DIR, --retrieval DIR and/or --cost")
    if args.zeroshot:
        eval_set = open_eval_set(args.zeroshot)
        resolve_classnames(args.classnames, eval_set.classnames)
        resolve_templates(args.templates, eval_set.templates)
    if args.retrieval:
        open_eval_set(args.retrieval)
    for name in ("batch_size", "cost_batch_size", "cost_iters", "max_samples", "workers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be positive")


def run_eval(args) -> tuple[dict, int]:
    """Every rank runs this; returns (the record, identical on every rank; this rank)."""
    import torch

    from training.evaluation.cost import model_cost
    from training.evaluation.features import autocast
    from training.evaluation.loading import load_for_eval
    from training.evaluation.suite import eval_transform, run_retrieval, run_zeroshot

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    autocast(device, args.precision)  # refuses fp16 on the CPU before the model is built
    rank, world_size = _init_distributed()
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    loaded = load_for_eval(args.checkpoint, args.model, device)
    common = dict(tokenizer=loaded.spec.tokenizer,
                  transform=eval_transform(loaded.spec.preprocess_cfg), device=device,
                  precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                  rank=rank, world_size=world_size, max_samples=args.max_samples)
    record = {"model": loaded.name, "checkpoint": loaded.source, "precision": args.precision,
              "device": str(device), "world_size": world_size}
    started = time.perf_counter()
    if args.zeroshot:
        record["zeroshot"] = {"dataset": args.zeroshot, **run_zeroshot(
            loaded.model, args.zeroshot, classnames=args.classnames, templates=args.templates,
            **common)}
    if args.retrieval:
        record["retrieval"] = {"dataset": args.retrieval,
                               **run_retrieval(loaded.model, args.retrieval, **common)}
    if args.cost and rank == 0:  # one process measures: ranks would compete for the cores
        record["cost"] = model_cost(loaded.model, args.cost_batch_size, args.precision,
                                    iters=args.cost_iters)
    record["eval_seconds"] = round(time.perf_counter() - started, 2)
    return record, rank


def _init_distributed() -> tuple[int, int]:
    """A plain torch.distributed process group from the launcher's variables (no DeepSpeed:
    evaluation needs only all_gather_object, and DeepSpeed's import costs seconds per rank)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from training.distributed import rank_info_from_env

    info = rank_info_from_env()
    if info.world_size <= 1:
        return 0, 1
    if info.backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(info.backend, timeout=timedelta(seconds=120))
    return info.rank, info.world_size


def write_record(record: dict, out: str | None) -> str:
    """Print and (with --out) write the JSON record and its markdown row; return the row."""
    from training.evaluation.report import ZOO_HEADER, zoo_row

    row = zoo_row(record)
    print(json.dumps(record, indent=2))
    print(ZOO_HEADER + row, end="")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
        Path(out).with_suffix(".md").write_text(ZOO_HEADER + row)
    return row


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            from training.evaluation.report import write_report
            for path, written in write_report(args.run_dirs, args.out, args.labels).items():
                print(f"{path}: {written}")
            return 0
        if args.command == "latency":
            run_latency(args)
            return 0
        if args.command == "attribution":
            run_attribution(args)
            return 0
        _check_eval_args(args)
        record, rank = run_eval(args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"clip-eval: error: {err}\n")
    if rank == 0:
        write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
