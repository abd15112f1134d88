"""training.models: configs, builders, state-dict files, the DeepSpeed reshaping and open_clip export."""
import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from training.models import (DEFAULT_CONFIG_DIR, encode, export_open_clip, make_deepspeed_safe,
                             resolve_model_name, tower_param_counts)
from training.specs import build_student, build_teacher

# Name -> (image tower, text tower without token embedding), in millions, as the names say.
TINYCLIP_STUDENTS = {
    "TinyCLIP-ViT-8M-16-Text-3M": (8, 3),
    "TinyCLIP-ViT-39M-16-Text-19M": (39, 19),
    "TinyCLIP-ViT-40M-32-Text-19M": (40, 19),
    "TinyCLIP-ViT-61M-32-Text-29M": (61, 29),
    "TinyCLIP-ResNet-19M-Text-19M": (19, 19),
    "TinyCLIP-ResNet-30M-Text-29M": (30, 29),
}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 64, generator=g)
    texts = open_clip.get_tokenizer(resolve_model_name("Tiny-ViT-Student"))(["a red square", "a blue disc", "x"])
    return images, texts


def same_outputs(a, b, atol=0.0):
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in ("image_features", "text_features", "logit_scale"))


def eval_outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return encode(model, *batch)


@pytest.mark.parametrize("name, millions", TINYCLIP_STUDENTS.items())
def test_tinyclip_configs_have_the_parameter_counts_their_names_say(name, millions):
    assert (DEFAULT_CONFIG_DIR / f"{name}.json").is_file()
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = open_clip.create_model(resolve_model_name(name), device="meta")
    counts = tower_param_counts(model)
    assert round(counts["image"] / 1e6) == millions[0]
    assert round(counts["text"] / 1e6) == millions[1]
    cfg = open_clip.get_model_config(name)
    assert cfg["vision_cfg"]["image_size"] == 224 and cfg["text_cfg"]["context_length"] == 77


def test_build_student_from_a_json_file_and_what_info_says(batch):
    model, info = build_student(str(DEFAULT_CONFIG_DIR / "Tiny-ViT-Student.json"))
    assert info.name == "Tiny-ViT-Student" and info.embed_dim == 64 and info.context_length == 32
    assert info.image_size in (64, (64, 64)) and info.interpolation == "bicubic"
    assert info.mean == open_clip.OPENAI_DATASET_MEAN and info.std == open_clip.OPENAI_DATASET_STD
    assert info.tokenizer(["a b c"]).shape == (1, 32)
    counts = tower_param_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["text"] == counts["total"] - counts["image"] - 49408 * 64 - 1
    out = eval_outputs(model, batch)
    assert out["image_features"].shape == (3, 64) and out["logit_scale"].shape == ()
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["logit_scale"], model.logit_scale.exp())


def test_encode_casts_images_to_a_low_precision_student(batch):
    # open_clip's "bf16" keeps embeddings such as class_embedding in fp32 but convolutions in bf16.
    model, _ = build_student("Tiny-ViT-Student", precision="bf16")
    assert model.visual.class_embedding.dtype == torch.float32
    out = eval_outputs(model, batch)
    assert out["image_features"].dtype == torch.bfloat16 and out["image_features"].shape == (3, 64)


@pytest.mark.parametrize("fmt", ["safetensors", "pt_state_dict_key", "bin_module_prefix"])
def test_student_initial_state_dict_files(tmp_path, batch, fmt):
    torch.manual_seed(1)
    source, _ = build_student("Tiny-ViT-Student")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / {"safetensors": "w.safetensors", "pt_state_dict_key": "w.pt",
                       "bin_module_prefix": "w.bin"}[fmt]
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pt_state_dict_key":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    torch.manual_seed(2)
    model, _ = build_student("Tiny-ViT-Student", init_state_dict=str(path))
    assert same_outputs(eval_outputs(model, batch), eval_outputs(source, batch))


def test_a_state_dict_that_does_not_fit_is_one_line_naming_the_problems(tmp_path):
    teacher, _ = build_student("Tiny-ViT-Teacher")
    state = dict(teacher.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["ln_final.weight"]
    path = tmp_path / "teacher.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as err:
        build_student("Tiny-ViT-Student", init_state_dict=str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "unexpected (" in message and "extra.weight" in message
    assert "missing (1): ln_final.weight;" in message and "shape mismatch file vs model" in message
    assert "positional_embedding (32, 128) vs (32, 64)" in message
    with pytest.raises(ValueError, match="not found"):
        build_student("Tiny-ViT-Student", init_state_dict=str(tmp_path / "nope.pt"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match="expected one of"):
        build_student("Tiny-ViT-Student", init_state_dict=str(tmp_path / "w.txt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot be read"):
        build_student("Tiny-ViT-Student", init_state_dict=str(tmp_path / "garbage.pt"))


def test_bad_model_names_and_config_files(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'No-Such-Model'"):
        resolve_model_name("No-Such-Model")
    with pytest.raises(ValueError, match="not found"):
        resolve_model_name(str(tmp_path / "missing.json"))
    bad = tmp_path / "Bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="lacks vision_cfg, text_cfg"):
        resolve_model_name(str(bad))
    assert resolve_model_name("ViT-B-32") == "ViT-B-32"


def test_teacher_is_frozen_and_loads_a_local_file(tmp_path, batch):
    torch.manual_seed(3)
    source, _ = build_student("Tiny-ViT-Teacher")
    path = tmp_path / "teacher.pt"
    torch.save(source.state_dict(), path)
    teacher, info = build_teacher("Tiny-ViT-Teacher", pretrained=str(path))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert info.embed_dim == 64
    # Frozen parameters let PyTorch take its fused attention path: equal up to rounding.
    assert same_outputs(eval_outputs(teacher, batch), eval_outputs(source, batch), atol=1e-5)
    bf16, _ = build_teacher("Tiny-ViT-Teacher", pretrained=str(path), dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    out = eval_outputs(bf16, batch)  # fp32 images are cast to the teacher's dtype
    assert out["image_features"].dtype == torch.bfloat16
    assert same_outputs({k: v.float() for k, v in out.items()}, eval_outputs(source, batch), atol=0.05)


def test_teacher_tags_and_bad_values_are_clear_errors():
    # Offline (tests set HF_HUB_OFFLINE=1): a known tag fails to download with a one-line hint.
    with pytest.raises(ValueError, match="could not be downloaded.*pass a local weights file"):
        build_teacher("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="neither a state-dict file"):
        build_teacher("Tiny-ViT-Teacher", pretrained="no_such_tag")
    with pytest.raises(ValueError, match="teacher dtype"):
        build_teacher("Tiny-ViT-Teacher", dtype="int8")


def test_make_deepspeed_safe_removes_0_dim_parameters_and_keeps_outputs(batch):
    model, _ = build_student("Tiny-ViT-Student")
    before = eval_outputs(model, batch)
    assert any(p.ndim == 0 for p in model.parameters())
    make_deepspeed_safe(model)
    assert all(p.ndim > 0 for p in model.parameters())
    assert model.logit_scale.shape == (1,) and model.logit_scale.requires_grad
    assert same_outputs(eval_outputs(model, batch), before)


def test_export_loads_strictly_in_open_clip_both_ways(tmp_path, batch):
    torch.manual_seed(4)
    model, info = build_student("Tiny-ViT-Student")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    expected = eval_outputs(model, batch)
    make_deepspeed_safe(model)  # what the trainer holds when it exports
    out = export_open_clip(model, "Tiny-ViT-Student", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["Tiny-ViT-Student.json", "open_clip_config.json",
                                                     "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"] == info.model_cfg
    assert config["preprocess_cfg"]["mean"] == list(info.mean)

    from_dir = open_clip.create_model(f"local-dir:{out}", output_dict=True)
    assert same_outputs(eval_outputs(from_dir, batch), expected)
    open_clip.add_model_config(out / "Tiny-ViT-Student.json")
    from_file = open_clip.create_model("Tiny-ViT-Student", pretrained=str(out / "open_clip_model.safetensors"),
                                       output_dict=True)
    assert from_file.logit_scale.ndim == 0
    assert same_outputs(eval_outputs(from_file, batch), expected)
    # An export is a model name too: it can be the next stage's teacher.
    teacher, _ = build_teacher(f"local-dir:{out}")
    assert same_outputs(eval_outputs(teacher, batch), expected, atol=1e-5)


def test_export_from_a_consolidated_state_dict_and_a_wrong_one(tmp_path, batch):
    model, _ = build_student("Tiny-ViT-Student")
    state = {f"module.{k}": v.reshape(1) if v.ndim == 0 else v for k, v in model.state_dict().items()}
    out = export_open_clip(state, str(DEFAULT_CONFIG_DIR / "Tiny-ViT-Student.json"), tmp_path / "a")
    loaded = open_clip.create_model(f"local-dir:{out}", output_dict=True)
    assert same_outputs(eval_outputs(loaded, batch), eval_outputs(model, batch))
    with pytest.raises(ValueError, match="export of Tiny-ViT-Teacher does not fit"):
        export_open_clip(model.state_dict(), "Tiny-ViT-Teacher", tmp_path / "b")
    assert not (tmp_path / "b").exists()

