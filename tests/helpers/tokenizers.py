"""A student with a tokenizer of its own: a small BPE vocabulary and a model config naming it.

    config = write_small_vocab_model(tmp_path)        # tmp_path/Tiny-ViT-Student-bpe2000.json
    spec = model_spec(config)                          # spec.tokenizer: the small vocabulary
    reference = small_vocab_tokenizer(tmp_path)        # open_clip's SimpleTokenizer on that file

The vocabulary is open_clip's own (bpe_simple_vocab_16e6.txt.gz) cut to its first `n_merges`
merges, so it is a valid CLIP BPE whose ids differ from CLIP's for most words (fewer merges:
words split into more, different pieces) while staying in range of the smaller embedding
table: vocab_size = 256 bytes + 256 bytes</w> + n_merges + 2 special tokens.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from tests.helpers.evaluation import REPO_ROOT

SMALL_BPE_FILE = "small_bpe.txt.gz"
DEFAULT_MERGES = 2000


def small_vocab_size(n_merges: int = DEFAULT_MERGES) -> int:
    """SimpleTokenizer's vocabulary size for a BPE file of `n_merges` merges."""
    return 512 + n_merges + 2


def write_small_bpe(path: str | Path, n_merges: int = DEFAULT_MERGES) -> Path:
    """open_clip's BPE file cut to its header line and first `n_merges` merges (gzip)."""
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no trailing newline: SimpleTokenizer would read an empty last line as a merge
    with gzip.open(path, "wb") as f:
        f.write("\n".join(lines[:1 + n_merges]).encode("utf-8"))
    return path


def small_vocab_model_name(base: str = "Tiny-ViT-Student", n_merges: int = DEFAULT_MERGES,
                           context_length: int | None = None) -> str:
    """The config's stem, its open_clip name (unique per variant: open_clip's registry is global)."""
    return f"{base}-bpe{n_merges}" + (f"-ctx{context_length}" if context_length else "")


def write_small_vocab_model(folder: str | Path, base: str = "Tiny-ViT-Student",
                            n_merges: int = DEFAULT_MERGES, context_length: int | None = None
                            ) -> Path:
    """configs/models/<base>.json with text_cfg.vocab_size and tokenizer_kwargs.bpe_path set to
    a small vocabulary written beside it (relative path: the JSON's folder), optionally another
    context length; returns the JSON's path (a model spec)."""
    folder = Path(folder)
    write_small_bpe(folder / SMALL_BPE_FILE, n_merges)
    cfg = json.loads((REPO_ROOT / "configs" / "models" / f"{base}.json").read_text())
    cfg["text_cfg"]["vocab_size"] = small_vocab_size(n_merges)
    cfg["text_cfg"]["tokenizer_kwargs"] = {"bpe_path": SMALL_BPE_FILE}
    if context_length:
        cfg["text_cfg"]["context_length"] = context_length
    path = folder / f"{small_vocab_model_name(base, n_merges, context_length)}.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def small_vocab_tokenizer(folder: str | Path, context_length: int):
    """open_clip's SimpleTokenizer on the small vocabulary in `folder` (the reference ids)."""
    import open_clip
    return open_clip.SimpleTokenizer(bpe_path=str(Path(folder) / SMALL_BPE_FILE),
                                     context_length=context_length)
