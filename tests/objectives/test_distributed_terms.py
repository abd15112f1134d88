"""The new terms under 2 ranks (real torchrun, gloo): each rank holds half the images and their
K captions; the mean of the per-rank losses is the full-batch loss and the rank-averaged
gradients (towers, learned temperature, balancer log-variances) equal one process's full-batch
gradients. Linear towers keep it fast; test_distributed_grad.py does the same with real
DeepSpeed engines for the original terms."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.torchrun import run_torchrun
from training.objectives import DistillationLoss, TermModels

N, K, D_IN, D, WORLD = 8, 2, 10, 6, 2
CASES = {
    "tempkd_k2": {"terms": {"tempkd": {"temperature": 0.1}}},
    "tempkd_learned": {"terms": {"tempkd": {"temperature": 0.2, "learned": True}}},
    "interactive_k2": {"terms": {"interactive": {}}, "fixed_logit_scale": 20.0},
    "all_k2_uncertainty": {"terms": {"affinity": {}, "clip": {"weight": 0.5}, "tempkd": {},
                                     "interactive": {}}, "balance": "uncertainty"},
    "loss_ratio_k2": {"terms": {"affinity": {}, "clip": {}}, "balance": "loss_ratio"},
}


def make_inputs(folder) -> dict:
    g = torch.Generator().manual_seed(0)
    towers = {"image": torch.nn.Linear(D_IN, D), "text": torch.nn.Linear(D_IN, D)}
    inputs = {"images": torch.randn(N, D_IN, generator=g), "texts": torch.randn(N * K, D_IN, generator=g),
              "teacher": {"image_features": F.normalize(torch.randn(N, D, generator=g), dim=-1),
                          "text_features": F.normalize(torch.randn(N * K, D, generator=g), dim=-1),
                          "logit_scale": torch.tensor(40.0)},
              "towers": {k: t.state_dict() for k, t in towers.items()}, "cases": CASES}
    torch.save(inputs, folder / "inputs.pt")
    return inputs


def forward_and_backward(inputs: dict, case: dict, images: slice, texts: slice):
    """The loss of `case` on the given rows and every parameter's gradient (towers, the student's
    logit scale, the loss's heads)."""
    towers = {k: torch.nn.Linear(D_IN, D) for k in ("image", "text")}
    for key, tower in towers.items():
        tower.load_state_dict(inputs["towers"][key])
    logit_scale = torch.nn.Parameter(torch.tensor(14.0))
    loss_fn = DistillationLoss(**case)
    heads = loss_fn.task_parts(TermModels(None, None, D, D))[0]
    student = {"image_features": F.normalize(towers["image"](inputs["images"][images]), dim=-1),
               "text_features": F.normalize(towers["text"](inputs["texts"][texts]), dim=-1),
               "logit_scale": logit_scale * 1.0}
    for head in heads.values():
        student.update(head(student))
    teacher = {"image_features": inputs["teacher"]["image_features"][images],
               "text_features": inputs["teacher"]["text_features"][texts],
               "logit_scale": inputs["teacher"]["logit_scale"]}
    loss = loss_fn(student, teacher)["loss"]
    loss.backward()
    params = {f"{k}.{n}": p for k, t in towers.items() for n, p in t.named_parameters()}
    params["logit_scale"] = logit_scale
    params.update({f"heads.{h}.{n}": p for h, head in heads.items() for n, p in head.named_parameters()})
    return loss.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


@pytest.mark.slow
def test_two_ranks_give_the_full_batch_loss_and_gradient_with_k2_captions(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir(), out.mkdir()
    inputs = make_inputs(data)
    run_torchrun(["tests/objectives/dist_terms_worker.py", "--data", str(data), "--out", str(out)],
                 nproc=WORLD, timeout=240)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name, case in CASES.items():
        loss, grads = forward_and_backward(inputs, case, slice(None), slice(None))
        assert torch.allclose(torch.stack([r[name]["loss"] for r in ranks]).mean(), loss, atol=1e-5), name
        expected = {"image.weight", "text.weight", "image.bias", "text.bias"}
        expected |= {"heads.tempkd_temperature.log_temperature"} if "learned" in name else set()
        expected |= {"heads.balance.log_vars"} if case.get("balance") == "uncertainty" else set()
        assert expected <= set(grads), name
        for record in ranks:
            assert set(record[name]["grads"]) == set(grads), name
            for param, grad in grads.items():
                assert torch.allclose(record[name]["grads"][param], grad, atol=1e-5, rtol=1e-4), (name, param)
        assert all(grads[p].abs().sum() > 0 for p in expected), name
