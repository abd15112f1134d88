"""A student whose tokenizer differs from its teacher's gets the right ids on both sides, in
training and in evaluation: one student with another context length (16 vs the teacher's 32) and
one with another vocabulary (a 2,000-merge BPE, 2,514 ids, vs CLIP's 49,408). The model spec is
the one tokenizer source (training/specs.py)."""
from __future__ import annotations

import json

import pytest

from tests.helpers.shards import make_synthetic_shards
from tests.helpers.tokenizers import small_vocab_size, write_small_vocab_model
from tests.helpers.torchrun import REPO_ROOT, run_worker
from training.specs import model_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("tok") / "shards", train=64, val=32,
                                 zeroshot=0, samples_per_shard=32)


def student_config(kind: str, folder) -> str:
    if kind == "vocabulary":
        return str(write_small_vocab_model(folder))
    cfg = json.loads((REPO_ROOT / "configs" / "models" / "Tiny-ViT-Student.json").read_text())
    cfg["text_cfg"]["context_length"] = 16
    path = folder / "Tiny-ViT-Student-ctx16.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("kind", ["context", "vocabulary"])
def test_student_and_teacher_each_get_their_own_ids(kind, shards, tmp_path):
    student = student_config(kind, tmp_path)
    run_worker("tests/training/tokenizer_run.py", "--student", student, "--shards",
               shards["train_shards"], "--val", shards["val"], "--out", tmp_path, timeout=600)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["teacher_context"] == 32 and record["teacher_vocab"] == 49408
    if kind == "context":
        assert record["student_context"] == 16 and record["student_vocab"] == 49408
    else:
        assert record["student_context"] == 32 and record["student_vocab"] == small_vocab_size()
    assert record["ids_differ"]  # so feeding one side's ids to the other would be wrong
    assert record["text_is_student_ids"] and record["teacher_text_is_teacher_ids"]
    assert record["teacher_forwards"] == 2  # one per step (no accumulation)
    assert record["teacher_received_teacher_ids"]
    assert record["periodic_eval"] and record["periodic_eval"] == record["direct_eval"]


def test_same_tokenizer_is_recognised_and_a_different_one_is_not(tmp_path):
    """Equal identity means equal ids: the loader then sends the student's ids to the teacher."""
    teacher = model_spec("Tiny-ViT-Teacher").tokenizer
    assert model_spec("Tiny-ViT-Student").tokenizer.same_ids_as(teacher)  # both CLIP BPE, 32
    other = model_spec(student_config("vocabulary", tmp_path)).tokenizer
    assert not other.same_ids_as(teacher)
    assert not model_spec("ViT-B-32").tokenizer.same_ids_as(teacher)  # context 77 vs 32


def test_a_vocabulary_larger_than_the_embedding_table_is_refused(tmp_path):
    # (its own merge count: open_clip's registry is global and keyed by the JSON's stem)
    config = write_small_vocab_model(tmp_path, n_merges=1500)
    cfg = json.loads(config.read_text())
    cfg["text_cfg"]["vocab_size"] = small_vocab_size(1500) - 1
    config.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"has {small_vocab_size(1500)} ids but text_cfg.vocab_size"):
        model_spec(str(config)).tokenizer
