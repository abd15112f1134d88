"""The student's causal text tower on the batch's used tokens (training/text_prefix.py): the same
features and the same gradients as the whole context, inside the student's own forward; the
whole context where it cannot hold (text token outputs captured, other towers); and the loader's
CPU count of used positions equals what the ids' end-of-text positions give."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training import models, text_prefix
from training.data.loader import text_length
from training.specs import model_spec
from training.task import DistillationTask, FeatureProjection
from training.text_prefix import causal_text_length

CAPTIONS = ["a red circle", "two small blue squares at the top left of the picture",
            "three big green triangles", "one star"]
STUDENTS = Path(__file__).resolve().parents[2] / "configs" / "students"


@pytest.fixture
def prefix_calls(monkeypatch):
    """The lengths encode_text_prefix ran on (the trimming really happened)."""
    calls, real = [], text_prefix.encode_text_prefix

    def spy(model, texts, length, normalize=False):
        calls.append(length)
        return real(model, texts, length, normalize)
    monkeypatch.setattr(text_prefix, "encode_text_prefix", spy)
    return calls


def tiny_task(token_outputs=()) -> DistillationTask:
    torch.manual_seed(0)
    student = model_spec("Tiny-ViT-Student").build(precision="fp32", device="cpu")
    return models.make_deepspeed_safe(DistillationTask(
        student, {"projection": FeatureProjection(64, 96)}, token_outputs=token_outputs))


def batch():
    spec = model_spec("Tiny-ViT-Student")
    texts = spec.tokenizer(CAPTIONS)
    images = torch.randn(len(CAPTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return images, texts, text_length(texts, spec.tokenizer)


def loss_and_grads(task, outputs):
    """A loss reading every output (contrastive logits + the projected features), and the
    gradient of each parameter."""
    logits = outputs["logit_scale"] * outputs["image_features"] @ outputs["text_features"].T
    loss = (torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))
            + outputs["text_features_projected"].square().mean()
            + outputs["image_features_projected"].mean())
    task.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def test_loader_length_equals_the_end_of_text_positions():
    images, texts, length = batch()
    model = model_spec("Tiny-ViT-Student").build()
    assert length == int(texts.argmax(-1).max()) + 1 < texts.shape[1]  # padding to leave out
    assert causal_text_length(model, texts) == length == causal_text_length(model, texts, length)
    assert causal_text_length(model, texts, texts.shape[1]) is None  # the whole context: as is


def test_student_features_and_gradients_equal_the_whole_context(prefix_calls):
    task = tiny_task()
    images, texts, length = batch()
    trimmed = task(images, texts, text_length=length)
    assert prefix_calls == [length]
    trimmed_grads = loss_and_grads(task, trimmed)
    full = models.encode(task.student, images, texts)  # open_clip's forward, whole context
    full.update(task.heads["projection"](full))
    full_grads = loss_and_grads(task, full)
    assert prefix_calls == [length]
    for key in ("image_features", "text_features", "text_features_projected", "logit_scale"):
        torch.testing.assert_close(trimmed[key], full[key], atol=1e-6, rtol=0)
    assert trimmed_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():  # float32 rounding: 1e-6 of the gradient's scale
        difference = (trimmed_grads[name] - grad).abs().max()
        assert difference <= 1e-6 * grad.abs().max(), (name, difference)
    # The position rows past the used tokens: no gradient either way; the used ones: some.
    positions = trimmed_grads["student.positional_embedding"]
    assert torch.equal(positions[length:], torch.zeros_like(positions[length:]))
    assert torch.equal(full_grads["student.positional_embedding"][length:], positions[length:])
    assert positions[:length].abs().sum() > 0
    # Without the loader's count the ids' ends give the same length.
    task(images, texts)
    assert prefix_calls == [length, length]


def test_text_token_outputs_keep_the_whole_context(prefix_calls):
    images, texts, length = batch()
    out = tiny_task(token_outputs=["text_blocks.0"])(images, texts, text_length=length)
    assert prefix_calls == [] and out["text_blocks.0"].shape[1] == texts.shape[1]
    # Image token outputs leave the text tower free to trim.
    out = tiny_task(token_outputs=["image_blocks.0"])(images, texts, text_length=length)
    assert prefix_calls == [length] and "image_blocks.0" in out


def test_other_text_towers_run_the_whole_context(prefix_calls):
    images, texts, length = batch()
    spec = model_spec(f"two-tower:{STUDENTS / 'Mobile-CLIP-Tiny.json'}")
    student = spec.build()
    ids = spec.tokenizer(CAPTIONS)
    assert causal_text_length(student, ids, text_length(ids, spec.tokenizer)) is None
    size = spec.image_size if isinstance(spec.image_size, tuple) else (spec.image_size,) * 2
    DistillationTask(student)(torch.randn(len(CAPTIONS), 3, *size), ids, text_length=length)
    assert prefix_calls == []
