"""torchrun worker for tests/training/test_text_prefix_ranks.py: the same 2-rank ZeRO-3 run of
configs/tiny-distill.yaml (2 feature-cached micro-batches per step), once as the trainer is
(causal text towers on the batch's used tokens, training/text_prefix.py) and once with that
switched off (the whole context). Each rank writes OUT/rank<r>.json per run: the (context, length, who)
of every prefix encode, "who" being the student (train mode) or the teacher (eval mode), and
whether each length decision had the loader's count (no read of the ids on the device).
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

from tests.helpers.torchrun import worker_args
from tests.helpers.trainer import TINY_DISTILL, tiny_overrides
from training import text_prefix
from training.config import load_config
from training.trainer import Trainer

STEPS = 3


def train(name: str, shards: str, out: Path, trim: bool) -> list:
    overrides = tiny_overrides(shards, out / name, steps=STEPS, batch_size=4) + [
        "deepspeed.zero_stage=3", "optim.grad_accum_steps=2", "loss.clip_weight=0.5",
        "loss.fixed_logit_scale=null", "checkpoint.export_at_end=false"]
    calls, counted = [], []
    encode, length_of = text_prefix.encode_text_prefix, text_prefix.causal_text_length

    def recorded(model, texts, length, normalize=False):
        calls.append((texts.shape[1], length, "student" if model.training else "teacher"))
        return encode(model, texts, length, normalize)

    def length_given(model, texts, used=None):
        counted.append(used is not None)  # the loader's count came with the batch
        return length_of(model, texts, used)

    with ExitStack() as patches:
        patches.enter_context(mock.patch.object(text_prefix, "encode_text_prefix", recorded))
        patches.enter_context(mock.patch.object(text_prefix, "causal_text_length", length_given
                                                if trim else mock.Mock(return_value=None)))
        assert Trainer(load_config(TINY_DISTILL, overrides)).train()
    return {"prefix_encodes": calls, "loader_counted": counted}


def main() -> None:
    args, out, rank = worker_args("shards")
    calls = {name: train(name, args.shards, out, trim) for name, trim in
             (("used-tokens", True), ("whole-context", False))}
    (out / f"rank{rank}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    main()
