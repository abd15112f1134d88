"""A LiT student's step with the teacher's text features shared vs computed again by its own
frozen text tower (docs/students.md, "LiT student"): one run, side by side.

    python benchmarks/lit_text_sharing.py                  # batch 32, 2 micro-batches, 30 steps
    python benchmarks/lit_text_sharing.py --accum 1 --repeats 3

Same setup as benchmarks/distill_vs_openclip.py (whose runners this reuses): synthetic 64 px
shards, CPU, fp32, one loader worker, OMP_NUM_THREADS=--threads, per-step times from the
trainer's own log, CPU clock by default. The student is `lit:Tiny-LiT-Student` (Tiny-ViT-Student's
vision tower + Tiny-ViT-Teacher's text tower, frozen) distilled from Tiny-ViT-Teacher (random
weights in a local .pt), with `optim.grad_accum_steps=--accum` feature-cached micro-batches.
"shared" is the trainer as it is (the teacher source computes the step's text features once and
the student takes them); "unshared" is the same run with that hand-over switched off, so the
student runs its frozen text tower itself, in the caching pass and again in each grad pass.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmarks.distill_vs_openclip as peer  # noqa: E402
from benchmarks.distill_vs_openclip import prepare, summarise  # noqa: E402

STUDENT = "lit:Tiny-LiT-Student"


def unshared_child(clock: str, argv: list[str]) -> None:
    """The trainer with the hand-over of the teacher's text features switched off."""
    from training.trainer import Trainer

    Trainer.share_text_features = staticmethod(lambda micro_batches, teacher: None)
    peer.child("ours", clock, argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # peer.run_ours starts `python <this file> --child ours CLOCK`
        if os.environ.get("LIT_UNSHARED"):
            unshared_child(argv[2], argv[3:])
        else:
            peer.child(argv[1], argv[2], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="per micro-batch")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=30, help="steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out")
    parser.add_argument("--repeats", type=int, default=2, help="pairs (shared, unshared)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")

    extra = {"model.student": STUDENT, "optim.grad_accum_steps": args.accum}
    runs: dict[str, list] = {"shared": [], "unshared": []}
    with tempfile.TemporaryDirectory(prefix="lit_text_sharing-") as tmp_name:
        tmp = Path(tmp_name)
        inputs = prepare(tmp, args.steps * args.batch * args.accum)
        for i in range(args.repeats):
            for name in runs:
                os.environ.pop("LIT_UNSHARED", None)
                if name == "unshared":
                    os.environ["LIT_UNSHARED"] = "1"
                peer.__file__ = __file__  # run_ours starts `python <this file> --child ...`
                steps = peer.run_ours(inputs, tmp / f"{name}-{i}", args, extra)
                runs[name].append(summarise(steps, args.warmup, args.steps, name))
                print(f"  pair {i + 1} {name:8s} {runs[name][-1]['step_s'] * 1e3:7.1f} ms/step",
                      flush=True)
    shared, unshared = (statistics.median(r["step_s"] for r in runs[n]) for n in runs)
    print(f"LiT student, batch {args.batch} x {args.accum} micro-batches, {args.clock} clock: "
          f"shared {shared * 1e3:.1f} ms/step, unshared {unshared * 1e3:.1f} ms/step, "
          f"unshared / shared = {unshared / shared:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
