"""The text tokenizers of composed students: CLIP BPE, or BERT WordPiece from local vocabulary files.

    tokenizer = build_tokenizer({"kind": "wordpiece", "vocab": "vocab.txt"}, 32, base_dir)
    ids = tokenizer(["a photo of a dog"])   # [1, 32], padded with tokenizer.pad_id

A model JSON names its tokenizer in `text.tokenizer`:
- `{"kind": "clip-bpe"}`: open_clip's BPE (49408 ids, shipped with open_clip, pad id 0): the same
  identity as an open_clip teacher's tokenizer at the same context length, so the loader
  tokenizes once for both;
- `{"kind": "wordpiece", "vocab": "vocab.txt", "lowercase": true}`: a BERT WordPiece vocabulary
  (one token per line, as Hugging Face ships `vocab.txt`), relative to the JSON's folder. MiniLM's
  is obtained on a machine with network access with
  `huggingface-cli download nreimers/MiniLM-L6-H384-uncased vocab.txt --local-dir DIR`
  (no hub access at run time: the file is read from disk, never downloaded).
Ids are `[CLS] tokens [SEP] [PAD]...`, truncated to the context length (the BERT convention).
"""
from __future__ import annotations

import json
from pathlib import Path

from training.specs import TextTokenizer, _file_digest, open_clip_tokenizer

TOKENIZER_KINDS = ("clip-bpe", "wordpiece")


def vocab_path(cfg: dict, base_dir: Path) -> Path | None:
    """The vocabulary file a tokenizer config names (relative to the model JSON), if any."""
    vocab = cfg.get("vocab")
    return None if vocab is None else (Path(base_dir) / vocab)


def build_tokenizer(cfg: dict, context_length: int, base_dir: Path) -> TextTokenizer:
    kind = cfg.get("kind", "clip-bpe")
    if kind == "clip-bpe":
        return open_clip_tokenizer("", {}, context_length=context_length)
    if kind == "wordpiece":
        path = vocab_path(cfg, base_dir)
        if path is None or not path.is_file():
            raise ValueError(f"text.tokenizer.vocab {path}: WordPiece vocabulary file not found "
                             f"(see docs/students.md for how to obtain one)")
        return wordpiece_tokenizer(path, context_length, bool(cfg.get("lowercase", True)))
    raise ValueError(f"text.tokenizer.kind {kind!r}: expected one of {', '.join(TOKENIZER_KINDS)}")


def wordpiece_tokenizer(vocab_file: Path, context_length: int, lowercase: bool = True
                        ) -> TextTokenizer:
    from transformers import BertTokenizer  # the fast (Rust) WordPiece since transformers 5
    lines = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    inner = BertTokenizer(vocab={token: i for i, token in enumerate(lines)},
                          do_lower_case=lowercase)

    def encode(texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return inner(texts, padding="max_length", truncation=True, max_length=context_length,
                     return_tensors="pt")["input_ids"]

    identity = {"kind": "wordpiece", "vocab": _file_digest(str(vocab_file)),
                "lower": lowercase, "context": context_length}
    return TextTokenizer(encode=encode, context_length=context_length,
                         pad_id=int(inner.pad_token_id), vocab_size=len(inner),
                         identity=json.dumps(identity, sort_keys=True))
