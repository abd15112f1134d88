"""Worker for test_distributed_terms.py, run under torchrun with 2 ranks (gloo, CPU).

Reads DATA/inputs.pt (the full batch: image and text inputs with K captions per image, the
teacher's outputs, the initial weights of two linear towers, the loss cases). Each rank takes
its images and their K captions, runs the towers and the loss's task heads, the distributed loss
(local rows x gathered columns), backward, and averages the gradients over ranks as DeepSpeed
and DDP do; it saves its loss and the averaged gradients to OUT/rank{R}.pt.
"""
import torch
import torch.distributed as dist

from tests.helpers.torchrun import start_worker
from tests.objectives.test_distributed_terms import forward_and_backward


def main():
    info, inputs, _, out = start_worker()
    n = inputs["images"].shape[0] // info.world_size
    k = inputs["texts"].shape[0] // inputs["images"].shape[0]
    images, texts = slice(info.rank * n, (info.rank + 1) * n), slice(info.rank * n * k, (info.rank + 1) * n * k)
    record = {}
    for name, case in inputs["cases"].items():
        loss, grads = forward_and_backward(inputs, case, images, texts)
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= info.world_size
        record[name] = {"loss": loss, "grads": grads}
    torch.save(record, out / f"rank{info.rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
