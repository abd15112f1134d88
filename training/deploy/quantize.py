"""int8 by dynamic quantization (ONNX Runtime): weights of MatMul/Gemm and the token embedding
(Gather) stored as int8, activations quantized per batch at run time. No calibration data; the accuracy change is
measured, not assumed (training/deploy/cli.py runs zero-shot on both, the card reports it).
ONNX Runtime's recommended pre-processing (quant_pre_process: symbolic shape inference) fails on
the dynamo exporter's graphs (an Expand whose shape it cannot infer), so it is not run.

    int8_path = quantize_dynamic_int8("out/onnx/image_encoder.onnx")  # image_encoder.int8.onnx
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from training.files import write_atomic

INT8_SUFFIX = ".int8.onnx"


def int8_path_of(fp32_path: str | os.PathLike) -> Path:
    path = Path(fp32_path)
    return path.with_name(path.name.removesuffix(".onnx") + INT8_SUFFIX)


def quantize_dynamic_int8(fp32_path: str | os.PathLike) -> Path:
    """Write the int8 twin of an fp32 ONNX graph beside it; return its path."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run quant_pre_process: see the module docstring
    try:
        return write_atomic(int8_path_of(fp32_path), lambda tmp: quantize_dynamic(
            str(fp32_path), str(tmp), weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"]))
    finally:
        root.setLevel(level)
