"""One short distillation run whose student tokenizes differently from its teacher, recording the
ids each side received (run as a plain process by test_tokenizers.py).

    python tests/training/tokenizer_run.py --student S.json --shards PATTERN --val DIR --out DIR

Writes OUT/result.json: for the first training batch, whether `text` equals the student spec's
ids of the captions and `teacher_text` the teacher spec's; for every teacher forward of the run,
whether the ids it received were the teacher tokenizer's ids of that step's captions; the
periodic evaluation's numbers and those of a direct run_retrieval with the student's tokenizer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tests.helpers.trainer import TINY_DISTILL, tiny_overrides
from training.config import load_config
from training.evaluation.suite import eval_transform, run_retrieval
from training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--student", "--shards", "--val", "--out"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    out = Path(args.out)
    overrides = tiny_overrides(args.shards, out / "run", steps=2) + [
        f"model.student={args.student}", f"eval.val={args.val}", "eval.at_end=true",
        "checkpoint.export_at_end=false", "eval.batch_size=16"]
    trainer = Trainer(load_config(TINY_DISTILL, overrides))
    student_tok, teacher_tok = trainer.student_spec.tokenizer, trainer.teacher.tokenizer
    batch = next(iter(trainer.make_loader(epoch=0)))
    result = {
        "student_context": student_tok.context_length, "teacher_context": teacher_tok.context_length,
        "student_vocab": student_tok.vocab_size, "teacher_vocab": teacher_tok.vocab_size,
        "text_is_student_ids": torch.equal(batch["text"], student_tok(batch["caption"])),
        "teacher_text_is_teacher_ids": torch.equal(batch["teacher_text"],
                                                   teacher_tok(batch["caption"])),
        "ids_differ": batch["text"].shape != batch["teacher_text"].shape
        or not torch.equal(batch["text"], batch["teacher_text"]),
    }

    seen = []
    step_batches = trainer.step_batches

    def recording_batches():  # the captions of each step, to check what the teacher received
        for group, wait in step_batches():
            seen.append([c for mb in group for c in mb["caption"]])
            yield group, wait

    trainer.step_batches = recording_batches
    received = []  # the ids the live teacher encodes, per step (one micro-batch per step)
    encode = trainer.teacher.encode

    def recording_encode(images, texts, text_length=None):
        received.append(texts.clone())
        return encode(images, texts, text_length)

    trainer.teacher.encode = recording_encode
    trainer.train()
    result["teacher_forwards"] = len(received)
    result["teacher_received_teacher_ids"] = all(
        torch.equal(ids, teacher_tok(captions)) for ids, captions in zip(received, seen))

    periodic = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
                if "eval/val/image_to_text_R@1" in line][-1]
    direct = run_retrieval(trainer.task.student, args.val, tokenizer=student_tok,
                           transform=eval_transform(trainer.student_spec.preprocess_cfg),
                           batch_size=16)
    result["periodic_eval"] = {k.removeprefix("eval/val/"): v for k, v in periodic.items()
                               if k.startswith("eval/val/")}
    result["direct_eval"] = {k: direct[k] for k in result["periodic_eval"]}
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
