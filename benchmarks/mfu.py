"""Training-step FLOP utilisation and time breakdown of TinyCLIP distillation.

    python benchmarks/mfu.py                          # tiny CPU configs + ViT-40M/32 <- ViT-B/32
    python benchmarks/mfu.py --cases tiny --iters 10 --threads 2
    python benchmarks/mfu.py --device cuda --precision bf16 --cases vit40m --batch 256

What one step is: the trainer's work on one batch in one process: read the batch (the real
training loader, 0 workers, so this is what loader workers must hide), teacher forward (frozen,
no grad), student forward + affinity-mimicking loss (training.objectives.DistillationLoss), backward,
AdamW step. Communication: none in one process (the loss's gathers are identities there).

FLOPs: torch.utils.flop_counter.FlopCounterMode over teacher forward + student forward + loss +
backward, with attention made countable (training.evaluation.cost.countable_attention). The
optimizer's element-wise work is not counted (the usual model-FLOPs convention).
Peak: the best torch.matmul FLOP/s measured in the same process, same threads and dtype
(fp32 on the CPU; the --precision dtype on a GPU), before and after each case (the best of
all, so a busy moment does not lower the peak). MFU = counted FLOPs / step time / peak,
a ratio of two measurements taken side by side, so machine load affects both.
Models have random weights; images are the synthetic shards at each model's resolution.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import DataConfig, build_train_loader  # noqa: E402
from training.evaluation.cost import count_flops  # noqa: E402
from training.evaluation.features import autocast  # noqa: E402
from training.objectives import DistillationLoss  # noqa: E402
from training.specs import build_student, build_teacher  # noqa: E402
from training.text_prefix import encode_used_tokens  # noqa: E402


@dataclass
class Case:
    student: str
    teacher: str
    batch: int


CASES = {
    "tiny": Case("Tiny-ViT-Student", "Tiny-ViT-Teacher", 32),
    "vit40m": Case("TinyCLIP-ViT-40M-32-Text-19M", "ViT-B-32", 8),
}
PHASES = ("data", "teacher_forward", "student_forward_loss", "backward", "optimizer")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_dtype(device: torch.device, precision: str) -> torch.dtype:
    """fp32 on the CPU (its bf16 matmul is not faster here); the autocast dtype on a GPU."""
    if device.type != "cuda":
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """Best FLOP/s of an n x n @ n x n matmul over `reps` timed runs (after one warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


class Step:
    """Student, frozen teacher, loss, optimizer and a batch iterator of one case."""

    def __init__(self, case: Case, batch: int, device: torch.device, precision: str, data_dir: Path):
        self.device, self.precision = device, precision
        self.student, s_info = build_student(case.student, device=device)
        self.teacher, t_info = build_teacher(case.teacher, device=device)
        self.loss = DistillationLoss(affinity_weight=1.0, fixed_logit_scale=50.0)
        # The trainer's AdamW (training/optim.py: fused where the device has it).
        fused = device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-4, weight_decay=0.2,
                                           fused=fused or None)
        size = max(max(_pair(s_info.image_size)), max(_pair(t_info.image_size)))
        shards = self._shards(data_dir, size, batch)
        same_ids = s_info.tokenizer.same_ids_as(t_info.tokenizer)
        loader = build_train_loader(
            DataConfig(train=shards, batch_size=batch, workers=0, shuffle_buffer=0), seed=0,
            student_preprocess=s_info.preprocess_cfg, teacher_preprocess=t_info.preprocess_cfg,
            tokenizer=s_info.tokenizer, teacher_tokenizer=None if same_ids else t_info.tokenizer,
            rank=0, world_size=1, epoch=0)
        self.batches = iter(_forever(loader))
        self.student_params = sum(p.numel() for p in self.student.parameters())
        self.teacher_params = sum(p.numel() for p in self.teacher.parameters())

    @staticmethod
    def _shards(data_dir: Path, size: int, batch: int) -> str:
        from data_tools.synthetic import write_synthetic
        from tests.helpers.shards import shard_pattern
        folders = write_synthetic(data_dir / f"px{size}", train=max(4 * batch, 64), val=0,
                                  zeroshot=0, image_size=size, progress=False,
                                  samples_per_shard=max(4 * batch, 64))
        return shard_pattern(folders["train"])

    def next_batch(self) -> dict:
        batch = next(self.batches)
        moved = {k: batch[k].to(self.device) for k in ("image", "teacher_image", "text", "teacher_text")}
        return {**moved, "text_length": batch["text_length"],
                "teacher_text_length": batch["teacher_text_length"]}

    def teacher_forward(self, batch: dict) -> dict:
        return encode_used_tokens(self.teacher, None, batch["teacher_image"],
                                  batch["teacher_text"], batch["teacher_text_length"])

    def student_forward(self, batch: dict) -> dict:
        """As the trainer's task runs it: a causal text tower on the batch's used tokens."""
        return encode_used_tokens(self.student, None, batch["image"], batch["text"],
                                  batch["text_length"])

    def forward_backward(self, batch: dict) -> None:
        """Everything the FLOP counter sees: teacher forward, student forward + loss, backward."""
        with autocast(self.device, self.precision):
            with torch.no_grad():
                teacher = self.teacher_forward(batch)
            student = self.student_forward(batch)
        self.loss(student, teacher)["loss"].backward()

    def timed(self) -> dict[str, float]:
        """One full step, seconds per phase."""
        times, clock = {}, time.perf_counter

        def mark(name, start):
            sync(self.device)
            times[name] = clock() - start
            return clock()
        t = clock()
        batch = self.next_batch()
        t = mark("data", t)
        with autocast(self.device, self.precision):
            with torch.no_grad():
                teacher = self.teacher_forward(batch)
            t = mark("teacher_forward", t)
            student = self.student_forward(batch)
            loss = self.loss(student, teacher)["loss"]
        t = mark("student_forward_loss", t)
        loss.backward()
        t = mark("backward", t)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer", t)
        return times


def _pair(size) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _forever(loader):
    while True:
        yield from loader


def run_case(name: str, case: Case, args, device: torch.device, peak: float, data_dir: Path) -> dict:
    step = Step(case, args.batch or case.batch, device, args.precision, data_dir)
    flops = count_flops(step.forward_backward, step.next_batch())
    step.optimizer.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step.timed()
    samples = [step.timed() for _ in range(args.iters)]
    peak = max(peak, matmul_peak(device, peak_dtype(device, args.precision)))
    phases = {p: statistics.median(s[p] for s in samples) for p in PHASES}
    step_s = sum(phases.values())
    compute_s = step_s - phases["data"]
    return {
        "case": name, "student": case.student, "teacher": case.teacher,
        "student_params": step.student_params, "teacher_params": step.teacher_params,
        "batch": args.batch or case.batch, "precision": args.precision,
        "flops_per_step": flops, "step_s": step_s, "phases_s": phases,
        "achieved_flops": flops / step_s, "achieved_flops_without_data": flops / compute_s,
        "peak_flops": peak, "mfu": flops / step_s / peak, "mfu_without_data": flops / compute_s / peak,
    }


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| case | batch | GFLOP/step | step (s) | achieved GFLOP/s | peak GFLOP/s | MFU | "
             "MFU w/o data | data | teacher fwd | student fwd+loss | backward | optimizer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        shares = " | ".join(f"{100 * r['phases_s'][p] / r['step_s']:.0f}%" for p in PHASES)
        lines.append(
            f"| {r['student']} <- {r['teacher']} | {r['batch']} | {r['flops_per_step'] / 1e9:.1f} | "
            f"{r['step_s']:.3f} | {r['achieved_flops'] / 1e9:.1f} | {r['peak_flops'] / 1e9:.1f} | "
            f"{100 * r['mfu']:.1f}% | {100 * r['mfu_without_data']:.1f}% | {shares} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["tiny", "vit40m"])
    parser.add_argument("--batch", type=int, help="override each case's batch size")
    parser.add_argument("--iters", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast(device, args.precision)  # refuses fp16 on the CPU with one line
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for name in args.cases:
            peak = matmul_peak(device, peak_dtype(device, args.precision))
            results.append(run_case(name, CASES[name], args, device, peak, Path(tmp)))
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {args.threads} thread(s)")
    print(markdown(results, f"{where}, {args.precision}, median of {args.iters} steps after "
                            f"{args.warmup} warm-up; peak = best "
                            f"{peak_dtype(device, args.precision)} matmul 1024^3"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
