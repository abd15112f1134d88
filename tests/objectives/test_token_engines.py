"""Token-level outputs and the new terms in real DeepSpeed engines under torchrun (2 ranks, gloo,
CPU; tests/objectives/token_engines_worker.py): the 2-rank gradient of the attribution term
(captions of all ranks, gathered) and of the intermediate term equals one process's full-batch
gradient, and the task module's capture under ZeRO-3 gives ZeRO-0's outputs and the full-batch
gradient too."""
from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.torchrun import run_torchrun
from tests.helpers.trainer import probe_batch
from tests.objectives.token_engines_worker import build_task, terms_loss
from training.tokens import TokenCapture, encode_with_tokens

pytestmark = pytest.mark.slow
BATCH = 8


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_engines")
    data, out = root / "data", root / "out"
    data.mkdir()
    out.mkdir()
    images, texts = probe_batch(n=BATCH)
    inputs = {"student": "Tiny-ViT-Student", "teacher_model": "Tiny-ViT-Teacher",
              "pairs": {"image": [[1, 3]], "text": [[0, 2]]}, "images": images, "texts": texts}
    task = build_task(inputs)
    torch.manual_seed(1)
    teacher_model = open_clip.create_model("Tiny-ViT-Teacher", output_dict=True)
    capture = TokenCapture(teacher_model, ["image_patch_tokens", "image_blocks.3",
                                           "text_blocks.2"])
    with torch.no_grad():
        inputs["teacher"] = encode_with_tokens(teacher_model.eval(), capture, images, texts)
    inputs["shapes"] = {n: p.shape for n, p in task.named_parameters()}
    save_file({k: v.contiguous() for k, v in task.state_dict().items()},
              str(data / "task.safetensors"))
    torch.save(inputs, data / "inputs.pt")
    run_torchrun(["tests/objectives/token_engines_worker.py", str(data), str(out)], nproc=2,
                 timeout=400)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return inputs, data, ranks


def full_batch(inputs: dict, data, terms: tuple[str, ...]) -> tuple[torch.Tensor, dict]:
    """One process, the whole batch, no engine: the loss and the gradients."""
    task = build_task(inputs, str(data / "task.safetensors"))
    outputs = task(inputs["images"], inputs["texts"])
    loss = terms_loss(terms, inputs, outputs, inputs["teacher"])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in task.named_parameters() if p.grad is not None}


def assert_grads_equal(engine_grads: dict, reference: dict) -> None:
    """Equal on every parameter; one without a gradient on one side has zeros on the other
    (an engine keeps zero gradients of parameters the loss did not reach)."""
    assert set(reference) <= set(engine_grads)
    for name, grad in engine_grads.items():
        expected = reference.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["attribution", "intermediate"])
def test_two_rank_gradient_equals_full_batch_gradient(launch, case):
    inputs, data, ranks = launch
    loss, reference = full_batch(inputs, data, (case,))
    assert any(g.abs().sum() > 0 for g in reference.values())
    mean_loss = sum(rank[case]["loss"] for rank in ranks) / 2
    assert mean_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for rank in ranks:  # DeepSpeed averaged the ranks' gradients: the full batch's, on both
        assert_grads_equal(rank[case]["grads"], reference)


def test_zero3_capture_gives_zero0_outputs_and_the_full_batch_gradient(launch):
    inputs, data, ranks = launch
    for rank in ranks:
        zero0, zero3 = rank["attribution"]["outputs"], rank["both-zero3"]["outputs"]
        assert {"image_patch_tokens", "image_blocks.1", "text_blocks.0",
                "image_blocks_aligned.1", "text_blocks_aligned.0"} <= set(zero3)
        assert set(zero3) == set(zero0)
        for key in zero0:
            torch.testing.assert_close(zero3[key], zero0[key], rtol=1e-5, atol=1e-6, msg=key)
    _, reference = full_batch(inputs, data, ("attribution", "intermediate"))
    for rank in ranks:
        assert_grads_equal(rank["both-zero3"]["grads"], reference)
