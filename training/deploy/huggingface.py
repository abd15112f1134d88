"""A ViT student as a Hugging Face transformers `CLIPModel` folder (config, safetensors weights,
processor files), built locally: no hub download, `from_pretrained(folder)` works offline.

    folder = export_huggingface(model, spec, "out/huggingface")
    hf = CLIPModel.from_pretrained(folder); processor = CLIPProcessor.from_pretrained(folder)

open_clip's ViT CLIP and transformers' CLIP are the same network with other names: the fused
attention projection `in_proj_weight` is split into q/k/v, open_clip's `x @ proj` matrices become
`Linear` weights (transposed), text pooling at the end-of-text token holds because that token has
the highest id (argmax) and is the config's `eos_token_id` (first occurrence). Configs with parts
CLIP has no place for (layer scale, attentional pooling, timm or HF towers, ResNets, ...) are
refused by name before anything is written. The tokenizer files are open_clip's own BPE
vocabulary and merges, so the processor gives the student's ids.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from training.files import write_json_atomic
from training.specs import ModelSpec

# open_clip config keys transformers' CLIP holds (any value of the right kind) ...
VISION_FREE = {"layers": int, "width": int, "head_width": int, "mlp_ratio": (int, float),
               "patch_size": int, "image_size": (int, list, tuple), "patch_dropout": (int, float)}
TEXT_FREE = {"context_length": int, "vocab_size": int, "width": int, "heads": int,
             "layers": int, "mlp_ratio": (int, float), "tokenizer_kwargs": (dict, type(None))}
# ... and keys it holds only at open_clip's default (anything else changes the network).
VISION_DEFAULTS = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                   "pos_embed_type": "learnable", "final_ln_after_pool": False,
                   "pool_type": "tok", "output_tokens": False, "act_kwargs": None,
                   "norm_kwargs": None, "timm_model_name": None}
TEXT_DEFAULTS = {"ls_init_value": None, "embed_cls": False, "pad_id": 0,
                 "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax",
                 "proj_bias": False, "proj_type": "linear", "output_tokens": False,
                 "act_kwargs": None, "norm_kwargs": None, "hf_model_name": None,
                 "hf_tokenizer_name": None}
TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
             "custom_text"}
START_TOKEN, END_TOKEN = "<start_of_text>", "<end_of_text>"  # open_clip's special tokens


def unholdable(model_cfg: dict) -> list[str]:
    """Why transformers' CLIP cannot hold this open_clip model config ([] when it can)."""
    problems = [f"{k}" for k in model_cfg if k not in TOP_LEVEL]
    for section, free, defaults in (("vision_cfg", VISION_FREE, VISION_DEFAULTS),
                                    ("text_cfg", TEXT_FREE, TEXT_DEFAULTS)):
        cfg = model_cfg.get(section, {})
        for key, value in cfg.items():
            if key in free and isinstance(value, free[key]):
                continue
            if key in defaults and value == defaults[key]:
                continue
            problems.append(f"{section}.{key}={value!r}")
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        problems.append(f"vision_cfg.image_size={size!r} (not square)")
    return problems


def clip_config(spec: ModelSpec):
    """transformers.CLIPConfig of the same network as the spec's open_clip model."""
    from transformers import CLIPConfig

    cfg = spec.model_cfg
    problems = unholdable(cfg)
    if problems:
        raise ValueError(f"model {spec.name}: transformers' CLIPModel cannot hold "
                         f"{', '.join(problems)} (ViT students with open_clip's plain blocks only)")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    size = vision.get("image_size", 224)
    width = vision.get("width", 768)
    tokenizer = spec.tokenizer
    return CLIPConfig(
        projection_dim=cfg["embed_dim"],
        logit_scale_init_value=float(cfg.get("init_logit_scale", 2.6592)),
        vision_config=dict(
            hidden_size=width, num_hidden_layers=vision["layers"],
            num_attention_heads=width // vision.get("head_width", 64),
            intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
            image_size=size[0] if isinstance(size, (list, tuple)) else size,
            patch_size=vision["patch_size"], hidden_act=act, layer_norm_eps=1e-5,
            projection_dim=cfg["embed_dim"]),
        text_config=dict(
            vocab_size=text.get("vocab_size", 49408), hidden_size=text.get("width", 512),
            num_hidden_layers=text.get("layers", 12),
            num_attention_heads=text.get("heads", 8),
            intermediate_size=int(text.get("width", 512) * text.get("mlp_ratio", 4.0)),
            max_position_embeddings=tokenizer.context_length, hidden_act=act,
            layer_norm_eps=1e-5, projection_dim=cfg["embed_dim"],
            bos_token_id=tokenizer.encode.encoder[START_TOKEN],
            eos_token_id=tokenizer.encode.encoder[END_TOKEN],
            pad_token_id=tokenizer.pad_id))


BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def convert_state(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """open_clip ViT CLIP state dict -> transformers CLIPModel state dict; every open_clip
    tensor must find its place (a ValueError names the ones that do not)."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out = {"logit_scale": take("logit_scale").reshape(()),
           "visual_projection.weight": take("visual.proj").T,
           "text_projection.weight": take("text_projection").T,
           "vision_model.embeddings.class_embedding": take("visual.class_embedding"),
           "vision_model.embeddings.patch_embedding.weight": take("visual.conv1.weight"),
           "vision_model.embeddings.position_embedding.weight":
               take("visual.positional_embedding"),
           "text_model.embeddings.token_embedding.weight": take("token_embedding.weight"),
           "text_model.embeddings.position_embedding.weight": take("positional_embedding")}
    norms = {"visual.ln_pre": "vision_model.pre_layrnorm",
             "visual.ln_post": "vision_model.post_layernorm",
             "ln_final": "text_model.final_layer_norm"}
    for tower, src, dst in (("vision", "visual.transformer", "vision_model"),
                            ("text", "transformer", "text_model")):
        layers = getattr(config, f"{tower}_config").num_hidden_layers
        for i in range(layers):
            norms.update({f"{src}.resblocks.{i}.{a}": f"{dst}.encoder.layers.{i}.{b}"
                          for a, b in BLOCK_NAMES.items()})
            for part in ("weight", "bias"):
                q, k, v = take(f"{src}.resblocks.{i}.attn.in_proj_{part}").chunk(3)
                out.update({f"{dst}.encoder.layers.{i}.self_attn.{n}_proj.{part}": t
                            for n, t in zip("qkv", (q, k, v))})
    for src, dst in norms.items():
        out.update({f"{dst}.{p}": take(f"{src}.{p}") for p in ("weight", "bias")})
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"{len(left)} open_clip tensors have no place in transformers' "
                         f"CLIPModel: {', '.join(left[:4])}")
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def write_tokenizer_files(spec: ModelSpec, out_dir: Path):
    """vocab.json + merges.txt from the spec's open_clip BPE tokenizer, as a CLIPTokenizer."""
    from transformers import CLIPTokenizer

    bpe = spec.tokenizer.encode
    if not hasattr(bpe, "bpe_ranks"):
        raise ValueError(f"model {spec.name}: its tokenizer ({type(bpe).__name__}) is not "
                         f"open_clip's BPE tokenizer; no CLIPTokenizer files can be written")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    write_json_atomic(out_dir / "vocab.json", bpe.encoder)
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"),
                         bos_token=START_TOKEN, eos_token=END_TOKEN, unk_token=END_TOKEN,
                         pad_token=END_TOKEN, model_max_length=spec.tokenizer.context_length)


def image_processor(spec: ModelSpec):
    """CLIPImageProcessor doing open_clip's eval transform (resize shortest side, centre crop,
    normalise) for the spec's preprocess_cfg."""
    from transformers import CLIPImageProcessor

    cfg = spec.preprocess_cfg
    size = cfg["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    if cfg.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"model {spec.name}: preprocess resize_mode {cfg['resize_mode']!r} "
                         f"has no CLIPImageProcessor equivalent (only 'shortest')")
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}[cfg.get("interpolation", "bicubic")]
    return CLIPImageProcessor(size={"shortest_edge": size},
                              crop_size={"height": size, "width": size}, resample=resample,
                              image_mean=list(cfg["mean"]), image_std=list(cfg["std"]))


def export_huggingface(model: torch.nn.Module, spec: ModelSpec, out_dir: str | os.PathLike
                       ) -> Path:
    """Write config.json, model.safetensors and the processor files; return the folder."""
    from transformers import CLIPModel, CLIPProcessor

    config = clip_config(spec)
    state = convert_state(model.state_dict(), config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = CLIPModel(config)
    hf.load_state_dict(state, strict=True)
    hf.save_pretrained(out_dir)
    tokenizer = write_tokenizer_files(spec, out_dir)
    CLIPProcessor(image_processor=image_processor(spec), tokenizer=tokenizer
                  ).save_pretrained(out_dir)
    return out_dir


class HuggingFaceClip(torch.nn.Module):
    """A transformers CLIPModel behind open_clip's encode_image / encode_text, so evaluation
    and parity code run on it unchanged."""

    def __init__(self, folder: str | os.PathLike):
        super().__init__()
        from transformers import CLIPModel
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = _features(self.model.get_image_features(pixel_values=images))
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = _features(self.model.get_text_features(input_ids=ids))
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def _features(out):
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
