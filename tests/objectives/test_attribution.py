"""The `attribution` term (training/objectives/attribution.py) against explicit loops on a small
batch, and the resizing of maps between patch grids of different sizes."""
from __future__ import annotations

import math

import pytest
import torch

from training.objectives.attribution import AttributionTerm, match_grids, resize_maps
from training.objectives.base import TermInputs


def outputs(patches: torch.Tensor, texts: torch.Tensor) -> dict:
    return {"image_patch_tokens": patches, "text_features": texts}


def inputs_for(student: dict, teacher: dict) -> TermInputs:
    ids = torch.arange(student["text_features"].shape[0])
    return TermInputs(student=student, teacher=teacher, local_ids=ids, global_ids=ids)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a))
                                               * math.sqrt(sum(y * y for y in b)))


def direct_map(patches: torch.Tensor, texts: torch.Tensor, b: int, n: int) -> list[float]:
    return [cosine(patches[b, p].tolist(), texts[n].tolist()) for p in range(patches.shape[1])]


def direct_loss(student: dict, teacher: dict, kind: str, temperature: float, paired: bool
                ) -> float:
    """Mean over (image, caption) maps of KL(softmax(t / T) || softmax(s / T)) over patches, or
    the mean squared difference of the maps, with plain Python arithmetic."""
    total, count = 0.0, 0
    batch = student["image_patch_tokens"].shape[0]
    for b in range(batch):
        for n in ([b] if paired else range(batch)):
            s = direct_map(student["image_patch_tokens"], student["text_features"], b, n)
            t = direct_map(teacher["image_patch_tokens"], teacher["text_features"], b, n)
            if kind == "mse":
                total += sum((x - y) ** 2 for x, y in zip(s, t))
                count += len(s)
                continue
            zs = sum(math.exp(x / temperature) for x in s)
            zt = sum(math.exp(y / temperature) for y in t)
            total += sum(math.exp(y / temperature) / zt
                         * (math.log(math.exp(y / temperature) / zt)
                            - math.log(math.exp(x / temperature) / zs)) for x, y in zip(s, t))
            count += 1
    return total / count


def random_side(seed: int, batch: int = 3, patches: int = 4, dim: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    texts = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return outputs(torch.randn(batch, patches, dim, generator=generator), texts)


@pytest.mark.parametrize("kind,captions", [("kl", "paired"), ("kl", "all"), ("mse", "paired"),
                                           ("mse", "all")])
def test_term_equals_explicit_loops(kind, captions):
    student, teacher = random_side(0), random_side(1)
    term = AttributionTerm(kind=kind, temperature=0.2, captions=captions)
    loss = term(inputs_for(student, teacher))
    expected = direct_loss(student, teacher, kind, 0.2, paired=captions == "paired")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert term(inputs_for(teacher, teacher)).item() == pytest.approx(0.0, abs=1e-6)


def test_only_the_student_gets_gradient():
    student, teacher = random_side(0), random_side(1)
    for side in (student, teacher):
        for value in side.values():
            value.requires_grad_(True)
    AttributionTerm(captions="all")(inputs_for(student, teacher)).backward()
    assert student["image_patch_tokens"].grad.abs().sum() > 0
    assert student["text_features"].grad.abs().sum() > 0
    assert teacher["image_patch_tokens"].grad is None and teacher["text_features"].grad is None


def test_maps_of_a_larger_grid_are_resized_to_the_smaller():
    """Bilinear halving (align_corners=False) of a 4x4 grid averages each 2x2 block: checked by
    hand; a student whose 4x4 map is the teacher's 2x2 map repeated matches it exactly."""
    maps = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16)
    halved = resize_maps(maps, 2)
    for m in range(2):
        grid = maps[m].reshape(4, 4)
        blocks = [grid[r:r + 2, c:c + 2].mean().item() for r in (0, 2) for c in (0, 2)]
        assert halved[m].tolist() == pytest.approx(blocks)
    small, large = match_grids(maps, halved)
    assert small.shape == large.shape == (2, 4)
    teacher = random_side(1, patches=4)
    # student patches: each teacher patch repeated over a 2x2 block of a 4x4 grid
    grid = teacher["image_patch_tokens"].reshape(3, 2, 2, 5)
    repeated = grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(3, 16, 5)
    student = outputs(repeated, teacher["text_features"])
    term = AttributionTerm(kind="mse")
    assert term(inputs_for(student, teacher)).item() == pytest.approx(0.0, abs=1e-10)
    assert term(inputs_for(random_side(2, patches=16), teacher)).item() > 0.01


def test_options_and_teacher_are_checked():
    with pytest.raises(ValueError, match="attribution.kind: 'l2' is not one of kl, mse"):
        AttributionTerm(kind="l2")
    with pytest.raises(ValueError, match="attribution.captions: 'some'"):
        AttributionTerm(captions="some")
    with pytest.raises(ValueError, match="temperature: 0 must be > 0"):
        AttributionTerm(temperature=0)
    with pytest.raises(ValueError, match="needs one live teacher"):
        AttributionTerm()(inputs_for(random_side(0), {"ensemble": [random_side(1)]}))
    with pytest.raises(ValueError, match="resizing needs square grids"):
        AttributionTerm()(inputs_for(random_side(0, patches=6), random_side(1, patches=4)))
