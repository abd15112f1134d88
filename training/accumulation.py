"""Gradient accumulation that stays exact with a batch-level loss (contrastive, affinity).

A contrastive or affinity loss couples every sample of the batch with every other, so summing
per-micro-batch losses is NOT the full-batch loss (OpenCLIP therefore refuses accumulation with
distillation). OpenCLIP's feature caching fixes that: first a no-grad pass over all micro-batches
caches the student's outputs; then, for each micro-batch j, a grad pass recomputes j's outputs
and evaluates the FULL-batch loss on [cached 0..j-1, live j, cached j+1..]. The gradient of that
pass is exactly dL/d(outputs_j) * d(outputs_j)/d(theta), and the sum over j is the full-batch
gradient. Dropout and BatchNorm stay exact: each grad pass replays its micro-batch's random
numbers and the running statistics are updated once per micro-batch (MicroBatchReplay).

Outputs shared by the whole batch (the logit scale, and any other entry without a batch axis)
get their gradient from every pass; they are kept live in pass 0 only, so it is counted once.
"""
from __future__ import annotations

import torch


def is_per_sample(value) -> bool:
    """Per-sample outputs are [batch, ...] matrices; scalars and [1]-shaped scales are shared."""
    return isinstance(value, torch.Tensor) and value.ndim >= 2


def concat_outputs(outputs: list[dict]) -> dict:
    """Join micro-batch outputs into one batch (shared entries taken from the first)."""
    first = outputs[0]
    return {key: torch.cat([out[key] for out in outputs]) if is_per_sample(first[key])
            else first[key] for key in first}


def with_live_micro_batch(cached: list[dict], live: dict, index: int) -> dict:
    """The full batch's outputs with micro-batch `index` carrying gradient, the rest detached.

    Shared entries come from part 0, so they are live in pass 0 only.
    """
    parts = [live if i == index else {k: _detach(v) for k, v in out.items()}
             for i, out in enumerate(cached)]
    return concat_outputs(parts)


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


# --------------------------------------------------------------------------- BatchNorm and dropout

def running_stat_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a train-mode forward updates: BatchNorm's running mean / var / batch count."""
    return [buffer for m in module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for buffer in m.buffers() if buffer is not None]


class MicroBatchReplay:
    """Makes the grad pass of micro-batch j see exactly what the caching pass of j saw.

    What "exact" means with BatchNorm and dropout: the reference is the same micro-batch
    partition WITHOUT caching: each micro-batch j runs one train-mode forward (BatchNorm
    normalises with j's own batch statistics, dropout draws j's masks from the RNG stream in
    order), their outputs are joined and the full-batch loss is backpropagated once. Feature
    caching runs every micro-batch twice, so it must
    - replay j's random numbers in j's grad pass (`randomness(j)`: the RNG state saved before j's
      caching forward), so the dropout masks are the cached ones, and
    - update the running statistics once per micro-batch, not twice: the caching pass updates
      them exactly as the reference's forwards would; `finish()` puts back that state after the
      grad passes (whose own updates are discarded) and the RNG stream where the caching pass
      left it.
    BatchNorm's train-mode output depends on the batch statistics only, never on the running
    buffers, so the grad pass's outputs equal the cached ones and the gradient is the reference's.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.buffers = running_stat_buffers(module)
        self.cuda = device.type == "cuda"
        self.device = device
        self.states: list[tuple] = []
        self.after_caching: tuple | None = None
        self.saved_buffers: list[torch.Tensor] = []

    def _rng_state(self) -> tuple:
        return (torch.get_rng_state(),
                torch.cuda.get_rng_state(self.device) if self.cuda else None)

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.device)

    def before_caching(self) -> None:
        """Call before each micro-batch's caching forward, in order."""
        self.states.append(self._rng_state())

    def caching_done(self) -> None:
        """Call after the caching pass: what the step must end with."""
        self.after_caching = self._rng_state()
        self.saved_buffers = [buffer.detach().clone() for buffer in self.buffers]

    def randomness(self, index: int) -> None:
        """Call before micro-batch `index`'s grad forward: its caching pass's random numbers."""
        self._set_rng_state(self.states[index])

    @torch.no_grad()
    def finish(self) -> None:
        """Call after the last grad pass: running statistics and RNG as after the caching pass."""
        for buffer, saved in zip(self.buffers, self.saved_buffers):
            buffer.copy_(saved)
        self._set_rng_state(self.after_caching)


def feature_cached_passes(forward, micro_batches: list, module: torch.nn.Module,
                          device: torch.device):
    """Yield (index, outputs) for each micro-batch's grad pass: the full batch's outputs with
    micro-batch `index` live (training/trainer.py backpropagates the full-batch loss of each).

    One micro-batch: a single plain pass. Several: the no-grad caching pass first, then one grad
    pass each, exact with BatchNorm and dropout (MicroBatchReplay). `forward(micro_batch)` is the
    task's forward; `module` the task module (its BatchNorm buffers).
    """
    if len(micro_batches) == 1:
        yield 0, forward(micro_batches[0])
        return
    replay = MicroBatchReplay(module, device)
    cached = []
    with torch.no_grad():
        for micro_batch in micro_batches:
            replay.before_caching()
            cached.append(forward(micro_batch))
    replay.caching_done()
    for index, micro_batch in enumerate(micro_batches):
        replay.randomness(index)
        yield index, with_live_micro_batch(cached, forward(micro_batch), index)
    replay.finish()
