"""Token-level outputs (training/tokens.py) through the task module and the live teacher, and the
`intermediate` term with its alignment head (training/objectives/intermediate.py), each against
a reference computed another way (open_clip's own forward_intermediates, explicit loops)."""
from __future__ import annotations

import open_clip
import pytest
import torch

from tests.helpers.trainer import probe_batch
from training import models
from training.accumulation import concat_outputs, with_live_micro_batch
from training.objectives.base import TermInputs
from training.objectives.intermediate import (BlockAlignment, IntermediateTerm, check_pairs,
                                              parse_pairs)
from training.task import DistillationTask
from training.teachers import LiveTeacher, StoredTeacher
from training.tokens import TokenCapture, encode_with_tokens

models.register_model_configs()
PAIRS = {"image": [[1, 3], [0, 1]], "text": [[1, 2]]}
TOKENS = ["image_blocks.0", "image_patch_tokens", "text_blocks.1", "text_token_features"]


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return open_clip.create_model(name, output_dict=True).eval()


@pytest.fixture(scope="module")
def pair():
    return tiny("Tiny-ViT-Student"), tiny("Tiny-ViT-Teacher", seed=1)


def reference_tokens(model, images, texts) -> dict:
    """The same outputs from open_clip's own forward_intermediates and its tower code."""
    inter = model.forward_intermediates(images, texts, image_indices=[0], text_indices=[1],
                                        image_output_fmt="NLC", image_output_extra_tokens=True,
                                        normalize=True)
    visual = model.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    x = model.token_embedding(texts) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return {"image_blocks.0": torch.cat([inter["image_intermediates_prefix"][0],
                                         inter["image_intermediates"][0]], dim=1),
            "text_blocks.1": inter["text_intermediates"][0],
            "image_patch_tokens": tokens @ visual.proj,
            "text_token_features": x @ model.text_projection}


def test_task_outputs_equal_open_clip_intermediates(pair):
    student, _ = pair
    images, texts = probe_batch(n=3)
    task = DistillationTask(student, token_outputs=TOKENS)
    with torch.no_grad():
        out = task(images, texts)
        plain = models.encode(student, images, texts)
        expected = reference_tokens(student, images, texts)
    assert out["image_blocks.0"].shape == (3, 65, 64)
    assert out["image_patch_tokens"].shape == (3, 64, 64)
    assert out["text_token_features"].shape == (3, 32, 64)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, rtol=1e-5, atol=1e-5)
    for key in ("image_features", "text_features"):  # capturing changes nothing else
        assert torch.equal(out[key], plain[key])


def test_feature_caching_concatenates_token_outputs(pair):
    """Two cached micro-batches + one live: the full batch's 3-d entries, in row order, and
    the gradient reaches the live micro-batch's tokens only."""
    student, _ = pair
    task = DistillationTask(student, token_outputs=["image_blocks.0", "image_patch_tokens"])
    images, texts = probe_batch(n=4)
    with torch.no_grad():
        full = task(images, texts)
        cached = [task(images[:2], texts[:2]), task(images[2:], texts[2:])]
    live = task(images[2:], texts[2:])
    joined = with_live_micro_batch(cached, live, 1)
    for key in ("image_blocks.0", "image_patch_tokens"):
        assert joined[key].shape == full[key].shape and joined[key].ndim == 3
        torch.testing.assert_close(joined[key], full[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(concat_outputs(cached)[key], full[key], rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(joined["image_patch_tokens"])
    grad, = torch.autograd.grad((joined["image_patch_tokens"] * weights).sum(),
                                live["image_patch_tokens"])
    assert torch.equal(grad, weights[2:])  # the live rows, in their place; rows 0-1 cached


def test_live_teacher_captures_and_stored_teacher_refuses(pair):
    _, teacher_model = pair
    teacher = LiveTeacher.__new__(LiveTeacher)  # the model alone: no config or files needed
    teacher.model, teacher.capture = teacher_model, None
    teacher.require_outputs(["image_blocks.3"], "loss.terms.intermediate")
    teacher.require_outputs(["image_patch_tokens"], "loss.terms.attribution")  # adds
    images, texts = probe_batch(n=4)
    batches = [{"teacher_image": images[:2], "teacher_text": texts[:2]},
               {"teacher_image": images[2:], "teacher_text": texts[2:]}]
    out = teacher.outputs(batches)
    with torch.no_grad():
        inter = teacher_model.forward_intermediates(images, None, image_indices=[3],
                                                    image_output_fmt="NLC")
    torch.testing.assert_close(out["image_blocks.3"][:, 1:], inter["image_intermediates"][0],
                               rtol=1e-5, atol=1e-5)
    assert out["image_patch_tokens"].shape == (4, 64, 64)
    stored = StoredTeacher.__new__(StoredTeacher)
    with pytest.raises(ValueError, match=r"^loss.terms.attribution needs the teacher's "
                       r"image_patch_tokens, which model.teacher_source=shards cannot give"):
        stored.require_outputs(["image_patch_tokens"], "loss.terms.attribution")
    stored.require_outputs([], "loss.terms.affinity")  # nothing asked: nothing refused


def test_capture_refusals_name_the_problem(pair):
    student, _ = pair
    with pytest.raises(ValueError, match=r"image_blocks.2: the image tower has 2 blocks"):
        TokenCapture(student, ["image_blocks.2"], who="student")
    with pytest.raises(ValueError, match="not a token-level output"):
        TokenCapture(student, ["image_tokens"], who="student")
    resnet = open_clip.create_model("Inherit-Tiny-RN-Student")
    with pytest.raises(ValueError, match="need an open_clip transformer tower, not "
                       "ModifiedResNet"):
        TokenCapture(resnet, ["image_blocks.0"], who="student")


def test_pairs_are_checked_before_training(pair):
    student, teacher = pair
    with pytest.raises(ValueError, match=r"pairs.image: \[1\] is not \[student block"):
        parse_pairs({"image": [[1]]})
    with pytest.raises(ValueError, match="keys among image, text"):
        parse_pairs({"vision": [[0, 0]]})
    with pytest.raises(ValueError, match="teacher block 4 does not exist"):
        check_pairs(parse_pairs({"image": [[0, 4]]}), student, teacher)
    coarse = open_clip.CLIP(embed_dim=64, vision_cfg={"image_size": 64, "layers": 1,
                                                      "width": 32, "head_width": 16, "patch_size": 16},
                            text_cfg={"context_length": 32, "width": 32, "heads": 2,
                                      "layers": 1})
    with pytest.raises(ValueError, match="65 vs 17 tokens per sample"):
        check_pairs(parse_pairs({"image": [[0, 0]]}), student, coarse)
    with pytest.raises(ValueError, match="kind: 'l1' is not one of mse, cosine"):
        IntermediateTerm(PAIRS, kind="l1")


def direct_distance(student_tokens, teacher_tokens, kind: str) -> float:
    """Per token, by explicit loops: squared error summed per element, or 1 - cosine."""
    total, count = 0.0, 0
    for b in range(student_tokens.shape[0]):
        for t in range(student_tokens.shape[1]):
            s, r = student_tokens[b, t].tolist(), teacher_tokens[b, t].tolist()
            if kind == "mse":
                total += sum((x - y) ** 2 for x, y in zip(s, r))
                count += len(s)
            else:
                dot = sum(x * y for x, y in zip(s, r))
                norms = sum(x * x for x in s) ** 0.5 * sum(y * y for y in r) ** 0.5
                total += 1 - dot / norms
                count += 1
    return total / count


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_intermediate_term_equals_explicit_loops(pair, kind):
    student, teacher_model = pair
    pairs = parse_pairs(PAIRS)
    head = BlockAlignment.for_models(pairs, student, teacher_model)
    assert set(head.token_inputs) == {"image_blocks.0", "image_blocks.1", "text_blocks.1"}
    task = DistillationTask(student, heads={"intermediate": head})
    capture = TokenCapture(teacher_model, ["image_blocks.1", "image_blocks.3", "text_blocks.2"])
    images, texts = probe_batch(n=2)
    out = task(images, texts)
    with torch.no_grad():
        teacher = encode_with_tokens(teacher_model, capture, images, texts)
    capture.remove()
    assert out["image_blocks_aligned.1"].shape == (2, 65, 128)
    assert out["text_blocks_aligned.1"].shape == (2, 32, 128)
    term = IntermediateTerm(PAIRS, kind=kind)
    assert set(term.student_keys) == {"image_blocks_aligned.1", "image_blocks_aligned.0",
                                      "text_blocks_aligned.1"}
    ids = torch.arange(2)
    loss = term(TermInputs(student=out, teacher=teacher, local_ids=ids, global_ids=ids))
    expected = sum(direct_distance(out[f"{tower}_blocks_aligned.{s}"].detach(),
                                   teacher[f"{tower}_blocks.{t}"], kind)
                   for tower, s, t in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()  # the alignment MLPs and the student's chosen blocks learn from it
    assert head.mlps["image_1"][0].weight.grad.abs().sum() > 0
    assert student.visual.transformer.resblocks[0].mlp.c_fc.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_outputs_and_gradients(pair):
    """Recomputing the blocks in the backward (open_clip's grad checkpointing) records nothing
    new: the same token outputs and the same gradients as without."""
    student, _ = pair
    images, texts = probe_batch(n=2)
    results = []
    for checkpointing in (False, True):
        task = DistillationTask(student, token_outputs=["image_blocks.0", "image_patch_tokens"])
        task.set_grad_checkpointing(checkpointing)
        student.zero_grad()
        out = task(images, texts)
        (out["image_blocks.0"].square().mean() + out["image_patch_tokens"].mean()).backward()
        results.append((out, {n: p.grad.clone() for n, p in student.named_parameters()
                              if p.grad is not None}))
        task.capture.remove()
    task.set_grad_checkpointing(False)
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    for key in ("image_blocks.0", "image_patch_tokens"):
        torch.testing.assert_close(checkpointed[key], plain[key])
    assert set(checkpointed_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)
