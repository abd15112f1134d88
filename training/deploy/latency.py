"""Inference latency per tower and backend (`clip-eval latency`), in TinyCLIP's model-zoo form.

Backends: PyTorch eager (CPU, or CUDA with --device cuda), ONNX Runtime fp32 and int8 on the
CPU (the graphs of training/deploy/onnx.py and quantize.py, written to a temporary folder).
Per backend: milliseconds per image and per text at batch 1 (latency), images/s and texts/s at a
throughput batch, and pairs/s = 1 / (1/images_per_s + 1/texts_per_s) as in evaluation/cost.py.
Timing is cost.py's loop (warm-up calls, then timed calls); inputs are blank images of the
model's size and a tokenized caption (the towers' cost does not depend on the values).

    rows = measure(loaded, ["pytorch", "onnx", "int8"], batch_size=64)
    # * text parameters without the token embedding, as TinyCLIP names its models
    print(LATENCY_HEADER + "".join(latency_row(r) for r in rows))
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from training.evaluation.cost import _samples_per_s, model_cost

BACKENDS = ("pytorch", "onnx", "int8")
LATENCY_HEADER = ("| Model | Backend | Params image + text (M)* | MACs image + text (G) | "
                  "Image ms (b=1) | Text ms (b=1) | Images/s | Texts/s | Pairs/s (b) |\n"
                  "|---|---|---|---|---|---|---|---|---|\n")


def backend_models(loaded, backends, work_dir: Path, threads: int | None, device: str):
    """(backend, device, model with encode_image / encode_text) for each backend asked for."""
    if "pytorch" in backends:
        yield "pytorch", device, loaded.model.to(device)
    if "onnx" in backends or "int8" in backends:
        from training.deploy.onnx import OnnxClip, export_onnx
        from training.deploy.quantize import quantize_dynamic_int8

        paths = export_onnx(loaded.model.to("cpu"), loaded.spec, work_dir)
        if "onnx" in backends:
            yield "onnx", "cpu", OnnxClip(paths["image"], paths["text"], threads)
        if "int8" in backends:
            q = {k: quantize_dynamic_int8(p) for k, p in paths.items()}
            yield "int8", "cpu", OnnxClip(q["image"], q["text"], threads)


def time_model(model, spec, device: str, batch_size: int, warmup: int, iters: int) -> dict:
    """Latency at batch 1 and throughput at `batch_size` of both towers."""
    from training.deploy.onnx import example_inputs

    result = {}
    with torch.no_grad():
        for batch, label in ((1, "b1"), (batch_size, "batch")):
            inputs = {k: v.to(device) for k, v in example_inputs(spec, batch).items()}
            result[f"images_per_s_{label}"] = _samples_per_s(
                lambda x: model.encode_image(x, normalize=True), inputs["image"], warmup, iters,
                device)
            result[f"texts_per_s_{label}"] = _samples_per_s(
                lambda x: model.encode_text(x, normalize=True), inputs["text"], warmup, iters,
                device)
    return {"image_ms_b1": 1000.0 / result["images_per_s_b1"],
            "text_ms_b1": 1000.0 / result["texts_per_s_b1"],
            "images_per_s": result["images_per_s_batch"],
            "texts_per_s": result["texts_per_s_batch"],
            "pairs_per_s": 1.0 / (1.0 / result["images_per_s_batch"]
                                  + 1.0 / result["texts_per_s_batch"]),
            "batch_size": batch_size}


def measure(loaded, backends=BACKENDS, batch_size: int = 64, warmup: int = 2, iters: int = 10,
            threads: int | None = None, device: str = "cpu") -> list[dict]:
    """One row per backend: the model's size and cost, then its timings."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cost = model_cost(loaded.model, batch_size=None)
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        for backend, dev, model in backend_models(loaded, backends, Path(work_dir), threads,
                                                  device):
            rows.append({"model": loaded.name, "source": loaded.source, "backend": backend,
                         "device": dev, "threads": threads,
                         "image_params": cost["image_params"],
                         "text_params": cost["text_params_no_token_embedding"],
                         "image_macs": cost["image_macs"], "text_macs": cost["text_macs"],
                         **time_model(model, loaded.spec, dev, batch_size, warmup, iters)})
    return rows


def latency_row(row: dict) -> str:
    name = Path(row["model"].removeprefix("local-dir:")).name
    backend = {"pytorch": f"PyTorch eager ({row['device']})", "onnx": "ONNX Runtime fp32",
               "int8": "ONNX Runtime int8"}[row["backend"]]
    return (f"| {name} | {backend} | {row['image_params'] / 1e6:.2f} + "
            f"{row['text_params'] / 1e6:.2f} | {row['image_macs'] / 1e9:.3f} + "
            f"{row['text_macs'] / 1e9:.3f} | {row['image_ms_b1']:.2f} | "
            f"{row['text_ms_b1']:.2f} | {_rate(row['images_per_s'])} | "
            f"{_rate(row['texts_per_s'])} | {_rate(row['pairs_per_s'])} ({row['batch_size']}) |\n")


def _rate(per_s: float) -> str:
    return f"{per_s:,.1f}" if per_s < 100 else f"{per_s:,.0f}"
