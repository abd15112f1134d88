"""The parts of composed students, one process, no training: towers, heads, tokenizers, the
spec kind's export folder and its errors (tests/students/test_students.py trains them)."""
from __future__ import annotations

import json
import shutil

import open_clip
import pytest
import timm
import torch

from tests.helpers.trainer import REPO_ROOT
from training import models
from training.evaluation.loading import load_for_eval
from training.specs import model_spec
from training.students.heads import ConvFFNHead, build_head
from training.students.lite_transformer import LiteTransformer
from training.students.vision import TimmTower

STUDENTS = REPO_ROOT / "configs" / "students"
MOBILE_TINY = f"two-tower:{STUDENTS / 'Mobile-CLIP-Tiny.json'}"
CONVFFN_TINY = f"two-tower:{STUDENTS / 'TinyCLIP-ConvFFN-Tiny.json'}"
CAPTIONS = ["a photo of a red circle.", "two small blue squares, at the top left",
            "an image with three green crosses that are large"]


def test_convffn_head_matches_a_hand_computation_and_ignores_padding():
    torch.manual_seed(0)
    head = ConvFFNHead(8, 6, 4, kernel_size=3, dropout=0.1).eval()
    tokens, real = torch.randn(1, 5, 8), 3
    mask = torch.tensor([[True] * real + [False] * 2])
    # by hand: project, convolve the real tokens only (zeros around them), GELU, mean, project
    x = head.fc_in(tokens[0, :real])                                      # [3, 6]
    padded = torch.cat([torch.zeros(1, 6), x, torch.zeros(1, 6)])        # the conv's zero padding
    w, b = head.conv.weight[:, 0], head.conv.bias                         # [6, 3], [6]
    conv = torch.stack([(padded[i:i + 3].T * w).sum(1) + b for i in range(real)])
    expected = head.norm(head.fc_out(torch.nn.functional.gelu(conv).mean(0)))
    torch.testing.assert_close(head(tokens, mask)[0], expected)
    # more padding, with garbage in it, changes nothing
    longer = torch.cat([tokens, 100 * torch.randn(1, 4, 8)], 1)
    torch.testing.assert_close(head(longer, torch.cat([mask, torch.zeros(1, 4, dtype=bool)], 1)),
                               head(tokens, mask))


def test_mlp_head_is_relu_dropout_and_pools_real_tokens_only():
    torch.manual_seed(0)
    head = build_head({"kind": "mlp", "hidden": 16, "dropout": 0.1, "pool": "mean"}, 8, 4,
                      tokens=True)
    mlp = head.head
    tokens, mask = torch.randn(2, 6, 8), torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=bool)
    mean = torch.stack([tokens[0, :3].mean(0), tokens[1].mean(0)])
    head.eval()
    torch.testing.assert_close(head(tokens, mask), mlp[3](torch.relu(mlp[0](mean))))
    head.train()  # dropout 0.1 is active in training only
    assert not torch.allclose(head(tokens, mask), head(tokens, mask))
    with pytest.raises(ValueError, match="convffn needs a token sequence"):
        build_head({"kind": "convffn"}, 8, 4, tokens=False)
    with pytest.raises(ValueError, match="head kind 'gru'"):
        build_head({"kind": "gru"}, 8, 4, tokens=True)


def test_lite_transformer_real_tokens_do_not_see_padding():
    torch.manual_seed(0)
    tower = LiteTransformer(vocab_size=50, context_length=12, width=16, layers=2, heads=2,
                            kernel_size=3).eval()
    ids = torch.tensor([[5, 7, 9, 11, 0, 0, 0, 0]])
    longer = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    short_out, mask = tower(ids, pad_id=0)
    long_out, _ = tower(longer, pad_id=0)
    torch.testing.assert_close(long_out[:, :4], short_out[:, :4])
    assert mask.tolist() == [[True] * 4 + [False] * 4]
    # the short-range branch is local, the long-range one global: changing the last real token
    # moves the first token's output (attention reaches across the caption)
    changed = ids.clone()
    changed[0, 3] = 13
    assert not torch.allclose(tower(changed, 0)[0][:, 0], short_out[:, 0])


def test_bert_tower_starts_without_segment_and_position_offsets_which_still_learn():
    from training.students.hf_text import BertTower
    torch.manual_seed(0)
    tower = BertTower({"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 32}, vocab_size=50, context_length=8)
    embeddings = tower.bert.embeddings
    assert not embeddings.token_type_embeddings.weight.any()
    assert not embeddings.position_embeddings.weight.any()
    assert embeddings.word_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.2)
    tokens, _ = tower(torch.tensor([[5, 7, 9, 0]]), pad_id=0)
    tokens.square().sum().backward()
    assert embeddings.position_embeddings.weight.grad[:3].abs().sum(1).gt(0).all()


def test_timm_tower_loads_a_local_timm_file_strictly_and_never_downloads(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    reference = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    save_file(reference.state_dict(), str(tmp_path / "mnv3.safetensors"))
    monkeypatch.setattr("timm.models.load_pretrained",
                        lambda *a, **k: pytest.fail("timm tried to fetch pretrained weights"))
    tower = TimmTower("mobilenetv3_small_050", 64, str(tmp_path / "mnv3.safetensors")).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
        torch.testing.assert_close(tower(images), expected)
    assert tower.out_dim == expected.shape[1] == 1024
    other = timm.create_model("mobilenetv3_small_075", pretrained=False)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"vision.pretrained_file .*other.safetensors does not "
                                         r"fit the model: .*shape mismatch"):
        TimmTower("mobilenetv3_small_050", 64, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="vision.model_name 'mobilenetv9': not a timm model"):
        TimmTower("mobilenetv9", 64)


def test_why_open_clip_timm_proj_linear_fails_for_mobilenetv3_and_what_works():
    """open_clip sizes its linear projection with num_features (960); MobileNetV3's head
    (conv_head) returns head_hidden_size (1280) features. `"timm_proj": ""` (timm's classifier
    as the projection) builds and runs; our tower reads head_hidden_size."""
    text = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    vision = {"timm_model_name": "mobilenetv3_large_100", "timm_pool": "avg", "image_size": 64}
    images = torch.randn(1, 3, 64, 64)
    broken = open_clip.model.CLIP(64, {**vision, "timm_proj": "linear"}, text)
    with pytest.raises(RuntimeError, match="1x1280 and 960x64"):
        broken.encode_image(images)
    working = open_clip.model.CLIP(64, {**vision, "timm_proj": ""}, text)
    assert working.encode_image(images).shape == (1, 64)
    assert TimmTower("mobilenetv3_large_100", 64).out_dim == 1280


def test_wordpiece_ids_are_the_vocabulary_lookups_and_clip_bpe_is_shared_with_the_teacher():
    spec = model_spec(CONVFFN_TINY)
    vocab = (STUDENTS / "tiny-wordpiece-vocab.txt").read_text().splitlines()
    ids = spec.tokenizer(["Two small blue squares, at the top left"])[0].tolist()
    words = ["[CLS]", "two", "small", "blue", "squares", ",", "at", "the", "top", "left", "[SEP]"]
    assert ids[:len(words)] == [vocab.index(w) for w in words]
    assert ids[len(words):] == [vocab.index("[PAD]")] * (32 - len(words))
    assert spec.tokenizer.pad_id == vocab.index("[PAD]") and spec.tokenizer.vocab_size == len(vocab)
    mobile, teacher = model_spec(MOBILE_TINY), model_spec("Tiny-ViT-Teacher")
    assert mobile.tokenizer.same_ids_as(teacher.tokenizer)  # the loader tokenizes once
    assert torch.equal(mobile.tokenizer(CAPTIONS), teacher.tokenizer(CAPTIONS))
    assert not spec.tokenizer.same_ids_as(teacher.tokenizer)


@pytest.mark.parametrize("source", [MOBILE_TINY, CONVFFN_TINY])
def test_export_folder_reloads_strictly_everywhere(source, tmp_path):
    torch.manual_seed(0)
    spec = model_spec(source)
    model = spec.build().eval()
    export = spec.export(models.make_deepspeed_safe(model).state_dict(), tmp_path / "export")
    images = torch.randn(2, 3, 64, 64)
    ids = spec.tokenizer(CAPTIONS[:2])
    with torch.no_grad():
        expected = models.encode(model, images, ids)
    for reloaded in (model_spec(f"two-tower:{export}").build(), load_for_eval(str(export)).model):
        with torch.no_grad():
            out = models.encode(reloaded.eval(), images, ids)
        for key in expected:
            assert torch.equal(out[key], expected[key]), key
    saved = json.loads((export / "student.json").read_text())
    assert saved["preprocess_cfg"] == spec.preprocess_cfg
    vocab = saved["text"]["tokenizer"].get("vocab")
    assert vocab is None or (export / vocab).is_file()  # the tokenizer travels with the weights
    # the export copied elsewhere is self-contained
    moved = shutil.copytree(export, tmp_path / "moved")
    assert model_spec(f"two-tower:{moved}").tokenizer.identity == spec.tokenizer.identity


def test_bad_exports_and_configs_fail_in_one_line(tmp_path):
    spec = model_spec(MOBILE_TINY)
    state = spec.build().state_dict()
    with pytest.raises(ValueError, match="export of Mobile-CLIP-Tiny does not fit the model: "
                                         "missing \\(1\\): logit_scale"):
        spec.export({k: v for k, v in state.items() if k != "logit_scale"}, tmp_path / "x")
    export = spec.export(state, tmp_path / "export")
    from safetensors.torch import save_file
    save_file({**state, "extra": torch.zeros(1)}, str(export / "model.safetensors"))
    with pytest.raises(ValueError, match="does not fit the model: unexpected \\(1\\): extra"):
        load_for_eval(str(export))
    cfg = json.loads((STUDENTS / "Mobile-CLIP-Tiny.json").read_text())
    for change, message in (({"text": {**cfg["text"], "tower": "lstm"}}, "text.tower 'lstm'"),
                            ({"text": {**cfg["text"], "tokenizer": {"kind": "wordpiece",
                                                                    "vocab": "nope.txt"}}},
                             "nope.txt: WordPiece vocabulary file not found")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=message):
            model_spec(f"two-tower:{path}").build()
    with pytest.raises(ValueError, match="missing.json not found"):
        model_spec(f"two-tower:{tmp_path / 'missing.json'}")


def test_timm_file_into_an_open_clip_students_trunk(tmp_path, capsys):
    """KDEOV's student is an open_clip config with a timm tower: timm_init writes the whole
    student's state dict with the timm file's trunk, for model.student_init (strict)."""
    from safetensors.torch import save_file

    from training.specs import build_student
    from training.students.timm_init import main as timm_init
    torch.manual_seed(2)
    reference = timm.create_model("cs3darknet_s", pretrained=False).eval()
    save_file(reference.state_dict(), str(tmp_path / "cs3.safetensors"))
    out = tmp_path / "init.safetensors"
    assert timm_init(["Tiny-KDEOV-Student", str(tmp_path / "cs3.safetensors"), str(out)]) == 0
    student, _ = build_student("Tiny-KDEOV-Student", out)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
        torch.testing.assert_close(student.eval().visual.trunk(images), expected)
    with pytest.raises(SystemExit) as exit_info:
        timm_init(["Tiny-ViT-Student", str(tmp_path / "cs3.safetensors"), str(out)])
    assert exit_info.value.code == 2
    assert "Tiny-ViT-Student: its vision_cfg has no timm_model_name" in capsys.readouterr().err
