"""The `two-tower:` model spec kind: composed students, from a JSON file or an export folder.

    spec = model_spec("two-tower:configs/students/Mobile-CLIP.json")   # random weights
    spec = model_spec("two-tower:runs/x/export")      # an export: student.json + weights, strict
    spec.export(state_dict, "out/")                  # student.json, model.safetensors, vocab

An export folder holds `student.json` (the model JSON with its preprocessing resolved, the
vision tower's pretrained file dropped: its weights are in the state), `model.safetensors` (the
whole model's state dict) and the tokenizer's vocabulary file when it has one. Building from a
folder loads the weights strictly, like open_clip's `local-dir:`; `model.student:
two-tower:DIR` (the next stage), `clip-eval --checkpoint DIR` and `clip-eval --model
two-tower:DIR` all read it that way.
"""
from __future__ import annotations

import json
import os
import shutil
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from training import models
from training.files import write_atomic, write_json_atomic
from training.specs import SPEC_KINDS, ModelSpec, TextTokenizer
from training.students.model import build_two_tower
from training.students.tokenizers import build_tokenizer, vocab_path
from training.students.vision import timm_preprocess

SPEC_FILE = "student.json"
WEIGHTS_FILE = "model.safetensors"
PRECISION_DTYPES = {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16,
                    "fp16": torch.float16, "pure_fp16": torch.float16}


class TwoTowerSpec(ModelSpec):
    kind = "two-tower"
    export_file = SPEC_FILE  # training.specs.export_folder_spec recognises exports by it

    def __init__(self, source: str):
        super().__init__(source)
        path = Path(source)
        self.folder = path if path.is_dir() else None
        self.json_path = path / SPEC_FILE if path.is_dir() else path
        if not self.json_path.is_file():
            raise ValueError(f"model two-tower:{source}: {self.json_path} not found")
        self.base_dir = self.json_path.resolve().parent
        self.name = path.name if self.folder else path.stem

    @cached_property
    def model_cfg(self) -> dict:
        try:
            cfg = json.loads(self.json_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"model config {self.json_path} is not valid JSON: {err}") from None
        missing = [k for k in ("embed_dim", "vision", "text") if k not in cfg]
        if missing:
            raise ValueError(f"model config {self.json_path} lacks {', '.join(missing)}")
        return cfg

    @cached_property
    def preprocess_cfg(self) -> dict:
        vision = self.model_cfg["vision"]
        return dict(self.model_cfg.get("preprocess_cfg")
                    or timm_preprocess(vision["model_name"], int(vision.get("image_size", 224))))

    @cached_property
    def tokenizer(self) -> TextTokenizer:
        text = self.model_cfg["text"]
        return build_tokenizer(text.get("tokenizer", {}), int(text.get("context_length", 77)),
                               self.base_dir)

    def _model(self, load_pretrained: bool = True) -> nn.Module:
        return build_two_tower(self.model_cfg, self.base_dir, self.tokenizer.pad_id,
                               self.tokenizer.vocab_size, load_pretrained)

    def build(self, precision: str = "fp32", device: str | torch.device = "cpu",
              pretrained: str | None = None) -> nn.Module:
        if pretrained is not None:
            raise ValueError(f"model two-tower:{self.source}: pretrained tags do not apply; "
                             f"pass a weights file (or export folder)")
        with models.quiet_random_init():
            model = self._model()
        if self.folder is not None:
            models.load_strict(model, models.load_state_dict_file(self.folder / WEIGHTS_FILE),
                               f"export {self.folder}")
        if precision in PRECISION_DTYPES:
            model = model.to(PRECISION_DTYPES[precision])
        return model.to(device)

    def export(self, state: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> Path:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in self._model(load_pretrained=False).state_dict().items()}
        state = {k.removeprefix("module."): v.detach().to("cpu").contiguous()
                 for k, v in state.items()}
        state = models.fit_state_dict(shapes, state, f"export of {self.name}")
        cfg = json.loads(json.dumps(self.model_cfg))
        cfg["preprocess_cfg"] = self.preprocess_cfg
        cfg["vision"].pop("pretrained_file", None)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        vocab = vocab_path(cfg["text"].get("tokenizer", {}), self.base_dir)
        if vocab is not None:
            target = out_dir / vocab.name
            if vocab.resolve() != target.resolve():
                write_atomic(target, lambda p: shutil.copyfile(vocab, p))
            cfg["text"]["tokenizer"]["vocab"] = vocab.name
        from safetensors.torch import save_file
        write_atomic(out_dir / WEIGHTS_FILE,
                     lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        write_json_atomic(out_dir / SPEC_FILE, cfg, indent=2)
        return out_dir


SPEC_KINDS[TwoTowerSpec.kind] = TwoTowerSpec
