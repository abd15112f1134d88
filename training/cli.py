"""`clip-train` / `python -m training`: --config YAML + key=value overrides -> Trainer.

    python -m training --config configs/tiny-distill.yaml run_dir=runs/x optim.total_steps=100
    torchrun --nproc_per_node 2 -m training --config ... deepspeed.zero_stage=2

Runs under torchrun, the deepspeed launcher, srun, or as a plain process (training/distributed.py
reads the rank from whichever is present). Expected bad input (config, data, files) ends with one
line on stderr and exit status 2, never a traceback. Exit 0 also after a preemption checkpoint
(done.json then does not exist: the job script requeues).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from training.config import ConfigError, load_config

EXIT_BAD_INPUT = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clip-train", description="Distil (or train) a CLIP model on DeepSpeed.",
        epilog="Overrides: section.key=value, e.g. optim.lr=5e-4 deepspeed.zero_stage=2")
    parser.add_argument("--config", help="training recipe (YAML), e.g. configs/tiny-clip.yaml")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print it resolved, and exit")
    parser.add_argument("--export", metavar="CHECKPOINT_DIR",
                        help="write that checkpoint's student in open_clip format and exit "
                             "(no training, no process group)")
    parser.add_argument("--out", help="folder for --export (default: RUN_DIR/export-<tag>)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK wins
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if not args.config and not args.export:
        parser.error("--config is required (or --export CHECKPOINT_DIR)")
    return args


def setup_logging() -> None:
    """Our INFO lines on rank 0; libraries (open_clip, DeepSpeed) only warn."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, datefmt="%H:%M:%S", force=True,
                        format=f"%(asctime)s [rank {rank}] %(message)s")
    logging.getLogger("training").setLevel(logging.INFO if rank == "0" else logging.WARNING)


def fail(err: BaseException) -> int:
    print(f"clip-train: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def export(tag_dir: str, out_dir: str | None) -> int:
    from training.checkpoint_files import find_tag_dir
    from training.export import export_checkpoint
    try:
        tag_dir = find_tag_dir(os.path.abspath(tag_dir))
        out_dir = out_dir or tag_dir.parent.parent / f"export-{tag_dir.name}"
        print(export_checkpoint(tag_dir, out_dir))
    except (FileNotFoundError, ValueError) as err:
        return fail(err)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.export:
        return export(args.export, args.out)
    try:  # bad config, files, model names or data specs: all raise before any training step
        cfg = load_config(args.config, args.overrides)
        if args.check:
            from omegaconf import OmegaConf
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
            return 0
        from training.trainer import Trainer  # heavy imports (deepspeed) after validation
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return fail(err)
    from training.checkpoint import CheckpointSaveError
    from training.data import DataError
    try:
        trainer.train()
    except (DataError, CheckpointSaveError) as err:  # too many corrupt samples, a full disk
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
