"""Evaluation tokenizes with the model's own tokenizer, from its spec (issue 9).

The student here has ANOTHER vocabulary (open_clip's BPE cut to 2000 merges, a 2514-row
embedding table): its export, a run directory of it and its JSON config all evaluate with its
own ids; CLIP's ids (what evaluation used for every model before) differ and do not even fit
its embedding table.
"""
import json

import open_clip
import pytest
import torch

from tests.helpers.tokenizers import (small_vocab_size, small_vocab_tokenizer,
                                      write_small_vocab_model)
from training.checkpoint_files import MANIFEST, manifest_of
from training.evaluation.cli import main
from training.evaluation.loading import load_for_eval
from training.evaluation.periodic import run_periodic_eval
from training.evaluation.suite import eval_transform, run_retrieval, run_zeroshot
from training.specs import model_spec

CAPTIONS = ["a red square", "picture 3 number 2: a purple square"]
CONTEXT = 32  # Tiny-ViT-Student's


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A random small-vocabulary student, its config folder and its export."""
    root = tmp_path_factory.mktemp("small_vocab")
    config = write_small_vocab_model(root / "config")
    spec = model_spec(config)
    torch.manual_seed(0)
    model = spec.build().eval()
    export = spec.export(model.state_dict(), root / "export")
    return {"config": config, "folder": root / "config", "spec": spec, "model": model,
            "export": export}


def test_export_loads_with_its_own_tokenizer(small_vocab):
    loaded = load_for_eval(str(small_vocab["export"]))
    ids = loaded.spec.tokenizer(CAPTIONS)
    torch.testing.assert_close(ids, small_vocab_tokenizer(small_vocab["folder"], CONTEXT)(CAPTIONS),
                               rtol=0, atol=0)
    clip_ids = open_clip.SimpleTokenizer(context_length=CONTEXT)(CAPTIONS)
    assert not torch.equal(ids, clip_ids)
    assert loaded.spec.tokenizer.vocab_size == small_vocab_size() \
        == loaded.model.token_embedding.num_embeddings == int(ids.max()) + 1  # eot is the last id
    assert int(clip_ids.max()) >= small_vocab_size()      # CLIP's ids overflow the table
    with pytest.raises(IndexError):
        loaded.model.encode_text(clip_ids)
    for key, value in small_vocab["model"].state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)


def test_clip_eval_and_periodic_eval_use_the_students_ids(small_vocab, eval_sets, tmp_path):
    """clip-eval on the export, the trainer's periodic evaluation with the config's spec, and a
    direct computation with the reference tokenizer give the same numbers; CLIP's tokenizer
    fails on this model."""
    sets = {"zeroshot": eval_sets["zeroshot"], "val": eval_sets["val"]}
    assert main(["eval", "--checkpoint", str(small_vocab["export"]), "--zeroshot",
                 str(sets["zeroshot"]), "--retrieval", str(sets["val"]), "--batch-size", "9",
                 "--out", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())

    model, spec = small_vocab["model"], small_vocab["spec"]
    direct = dict(tokenizer=small_vocab_tokenizer(small_vocab["folder"], CONTEXT),
                  transform=eval_transform(spec.preprocess_cfg))
    retrieval = run_retrieval(model, sets["val"], batch_size=9, **direct)
    zeroshot = run_zeroshot(model, sets["zeroshot"], batch_size=9, **direct)
    assert {k: record["retrieval"][k] for k in retrieval} == retrieval
    assert {k: record["zeroshot"][k] for k in zeroshot} == zeroshot
    assert retrieval["num_texts"] == 5 * 24 and zeroshot["num_images"] == 28

    periodic = run_periodic_eval(model, {"zeroshot": str(sets["zeroshot"]), "val": str(sets["val"]),
                                         "batch_size": 9}, None,
                                 tokenizer=spec.tokenizer, preprocess_cfg=spec.preprocess_cfg)
    assert periodic == {**{f"zeroshot/{k}": float(v) for k, v in zeroshot.items()
                           if f"zeroshot/{k}" in periodic},
                        **{f"val/{k}": float(v) for k, v in retrieval.items()
                           if f"val/{k}" in periodic}}
    assert len(periodic) == 13

    clip = dict(direct, tokenizer=open_clip.SimpleTokenizer(context_length=CONTEXT))
    with pytest.raises(IndexError):
        run_retrieval(model, sets["val"], batch_size=9, **clip)


def write_manifest(tag):
    """What the trainer writes last into a complete tag: every file's size and sha256."""
    (tag / MANIFEST).write_text(json.dumps(manifest_of(tag)))


def test_run_directory_takes_the_student_spec_from_run_json(small_vocab, tmp_path):
    """A checkpoint tag as the trainer writes it (ZeRO-0: the task module's state, `student.`
    and `heads.` keys; run.json with the resolved config): the student alone, its own tokenizer."""
    tag = tmp_path / "run" / "checkpoints" / "step-00000003"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text(tag.name)
    state = {f"student.{k}": v.clone() for k, v in small_vocab["model"].state_dict().items()}
    state["student.logit_scale"] = state["student.logit_scale"].reshape(1)  # deepspeed-safe
    state["heads.projection.linear.weight"] = torch.zeros(512, 64)
    torch.save({"module": state}, tag / "mp_rank_00_model_states.pt")
    record = {"config": {"model": {"student": str(small_vocab["config"])}}, "zero_stage": 0,
              "world_size": 1, "step": 3}
    (tag / "run.json").write_text(json.dumps(record))
    write_manifest(tag)

    loaded = load_for_eval(str(tmp_path / "run"))
    assert loaded.source == str(tag) and loaded.name == small_vocab["spec"].name
    assert torch.equal(loaded.spec.tokenizer(CAPTIONS),
                       small_vocab_tokenizer(small_vocab["folder"], CONTEXT)(CAPTIONS))
    for key, value in small_vocab["model"].state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)

    del record["config"]["model"]
    (tag / "run.json").write_text(json.dumps(record))
    write_manifest(tag)
    with pytest.raises(ValueError, match="names no config.model.student") as err:
        load_for_eval(str(tag))
    assert str(tag) in str(err.value) and "\n" not in str(err.value)
    assert load_for_eval(str(tag), model=str(small_vocab["config"])).source == str(tag)
