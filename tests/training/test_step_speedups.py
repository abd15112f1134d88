"""The training step's speed-ups change no result: the teacher's text tower on the batch's used
tokens only, and the fused AdamW kernel (docs/benchmarks.md, "what each change bought")."""
from __future__ import annotations

import pytest
import torch

from training import models
from training.config import ModelConfig, OptimConfig
from training.optim import build_optimizer
from training.specs import model_spec
from training.task import DistillationTask
from training.teachers import LiveTeacher
from training.text_prefix import causal_text_length


@pytest.fixture(scope="module")
def teacher():
    cfg = ModelConfig(teacher="Tiny-ViT-Teacher", teacher_pretrained=None)
    torch.manual_seed(0)
    return LiveTeacher(cfg, torch.device("cpu"))


def test_teacher_text_on_the_used_tokens_equals_the_full_encode(teacher):
    tokenizer = model_spec("Tiny-ViT-Teacher").tokenizer
    texts = tokenizer(["a red circle", "two small blue squares at the top left of the picture",
                       "three big green triangles"])
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    longest = int(texts.argmax(-1).max()) + 1  # the longest caption's end-of-text, inclusive
    assert causal_text_length(teacher.model, texts) == longest < texts.shape[1]
    with torch.no_grad():
        full = models.encode(teacher.model, images, texts)
        trimmed = teacher.encode(images, texts)
    assert torch.equal(trimmed["image_features"], full["image_features"])
    assert torch.equal(trimmed["logit_scale"], full["logit_scale"])
    torch.testing.assert_close(trimmed["text_features"], full["text_features"], atol=1e-6, rtol=0)
    # A batch whose longest caption fills the context has nothing to leave out.
    texts[0, -1] = texts.max() + 1
    assert causal_text_length(teacher.model, texts) is None


def test_fused_adamw_takes_the_for_loop_adamws_steps():
    torch.manual_seed(0)
    student = models.make_deepspeed_safe(
        DistillationTask(model_spec("Tiny-ViT-Student").build(precision="fp32", device="cpu")))
    reference = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1)
    fused = build_optimizer(student, cfg)
    assert all(group["fused"] for group in fused.param_groups)
    params = dict(student.named_parameters())
    ref_params = {n: torch.nn.Parameter(v.clone()) for n, v in reference.items()}
    names = {id(p): n for n, p in params.items()}
    loop = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"},
                               "params": [ref_params[names[id(p)]] for p in g["params"]],
                               "fused": None, "foreach": False} for g in fused.param_groups])
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for name, param in params.items():
            param.grad = torch.randn(param.shape, generator=generator) * 1e-2
            ref_params[name].grad = param.grad.clone()
        fused.step()
        loop.step()
    for name, param in params.items():
        torch.testing.assert_close(param.detach(), ref_params[name].detach(), atol=1e-6, rtol=1e-5)
    assert not torch.equal(params["student.token_embedding.weight"],
                           reference["student.token_embedding.weight"])
