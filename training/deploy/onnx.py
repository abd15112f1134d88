"""A student as two ONNX graphs, image encoder and text encoder, with a dynamic batch axis,
and the same two graphs run by ONNX Runtime behind open_clip's encode_image / encode_text.

    paths = export_onnx(model, spec, "out/onnx")   # image_encoder.onnx, text_encoder.onnx
    clip = OnnxClip(paths["image"], paths["text"])  # clip.encode_image(images) on the CPU

Each graph returns the tower's L2-normalised embedding (what zero-shot and retrieval use); the
logit scale is in preprocess.json beside them, with the image preprocessing and tokenizer facts
a runtime needs. Exported with torch.export (the dynamo exporter), one file per graph.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from training.files import write_atomic
from training.specs import ModelSpec

IMAGE_FILE, TEXT_FILE = "image_encoder.onnx", "text_encoder.onnx"
OPSET = 18


class Tower(torch.nn.Module):
    """One tower of an open_clip model as a module of its own: input -> normalised embedding."""

    def __init__(self, model: torch.nn.Module, which: str):
        super().__init__()
        self.model, self.which = model, which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encode = self.model.encode_image if self.which == "image" else self.model.encode_text
        return encode(x, normalize=True)


def example_inputs(spec: ModelSpec, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of the spec's shapes (to trace and to time with: values do not matter)."""
    size = spec.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    ids = spec.tokenizer(["a photo of a cat"] * batch_size)
    return {"image": torch.zeros(batch_size, 3, height, width), "text": ids}


def export_onnx(model: torch.nn.Module, spec: ModelSpec, out_dir: str | os.PathLike,
                opset: int = OPSET) -> dict[str, Path]:
    """Write image_encoder.onnx and text_encoder.onnx (fp32, dynamic batch); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = example_inputs(spec)
    paths = {}
    logging.getLogger("torch.onnx").setLevel(logging.WARNING)
    for which, file, output in (("image", IMAGE_FILE, "image_features"),
                                ("text", TEXT_FILE, "text_features")):
        batch = torch.export.Dim("batch", min=1)
        with torch.no_grad():
            program = torch.onnx.export(Tower(model, which).eval(), (inputs[which],),
                                        input_names=[which], output_names=[output],
                                        dynamic_shapes={"x": {0: batch}}, opset_version=opset,
                                        dynamo=True, external_data=False, verbose=False)
        paths[which] = write_atomic(out_dir / file,
                                    lambda tmp: program.save(str(tmp), external_data=False))
    return paths


def cpu_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session; `threads` intra-op threads (default: torch's count, so
    a comparison with PyTorch uses the same cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxClip(torch.nn.Module):
    """Two ONNX Runtime sessions behind open_clip's encode_image / encode_text (torch in and
    out), so evaluation and parity code run on them unchanged."""

    def __init__(self, image_path: str | os.PathLike, text_path: str | os.PathLike,
                 threads: int | None = None):
        super().__init__()
        self.image = cpu_session(image_path, threads)
        self.text = cpu_session(text_path, threads)

    @staticmethod
    def _run(session, x: torch.Tensor) -> torch.Tensor:
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x.detach().cpu().numpy())}
        return torch.from_numpy(session.run(None, feed)[0])

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._run(self.image, images.float())  # the graph normalises

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._run(self.text, ids.long())
