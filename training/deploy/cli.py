"""`clip-export` (also `python -m training.deploy`): a trained student as deployable files.

  clip-export SOURCE --out DIR [--model NAME_OR_JSON] [--formats openclip,onnx,int8,hf]
              [--fp16] [--zeroshot DIR] [--max-samples N] [--min-cosine 0.9999]

SOURCE: a run directory, one of its checkpoint tags, an exported open_clip folder, or a
state-dict file with --model (training/evaluation/loading.load_for_eval). DIR receives

  openclip/      release weights only (safetensors; --fp16 halves them), open_clip local-dir:
  onnx/          image_encoder.onnx, text_encoder.onnx (fp32, dynamic batch) and with int8
                 image_encoder.int8.onnx, text_encoder.int8.onnx (dynamic quantization)
  huggingface/   transformers CLIPModel + CLIPProcessor files (ViT students CLIP can hold)
  card.json, README.md   the model card (training/deploy/card.py), written last

Every format is reloaded from its files and compared with the PyTorch model on a fixed batch
(training/deploy/parity.py); an fp32 format under --min-cosine fails the command (exit 1) after
the card records the numbers. With --zeroshot each format's zero-shot top-1 is measured on the
set, so the int8 accuracy change is in the card. Bad input: one line, exit 2, before any export.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

FORMATS = ("openclip", "onnx", "int8", "hf")
CARD_NAMES = {"openclip": "pytorch_openclip", "onnx": "onnx_fp32", "int8": "onnx_int8",
              "hf": "huggingface"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-export", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="run dir, checkpoint tag, open_clip export folder or "
                        "state-dict file (with --model)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", help="open_clip name or JSON config (for a state-dict file)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"comma-separated subset of {','.join(FORMATS)}")
    parser.add_argument("--fp16", action="store_true", help="release weights in fp16")
    parser.add_argument("--zeroshot", metavar="DIR", help="labelled set: zero-shot top-1 of "
                        "every format (the int8 accuracy change)")
    parser.add_argument("--max-samples", type=int, help="first N samples of --zeroshot only")
    parser.add_argument("--batch-size", type=int, default=64, help="zero-shot batch size")
    parser.add_argument("--min-cosine", type=float, default=None,
                        help="parity bar for fp32 formats (default 0.9999)")
    return parser


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"--formats {text!r}: expected a comma-separated subset of "
                         f"{','.join(FORMATS)}")
    if "int8" in formats and "onnx" not in formats:
        formats.insert(formats.index("int8"), "onnx")  # int8 quantizes the fp32 graphs
    return formats


def check_args(args) -> list[str]:
    """Everything checkable before a model is built: formats, output folder, evaluation set."""
    formats = parse_formats(args.formats)
    out = Path(args.out).resolve()
    if Path(args.source).exists() and out == Path(args.source).resolve():
        raise ValueError(f"--out {args.out}: must differ from the source folder")
    if out.is_file():
        raise ValueError(f"--out {args.out}: is a file")
    if args.zeroshot:
        from training.evaluation.datasets import open_eval_set
        eval_set = open_eval_set(args.zeroshot)
        if not eval_set.classnames:
            raise ValueError(f"--zeroshot {args.zeroshot}: no classnames.txt (not a labelled set)")
    for name in ("max_samples", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    return formats


def files_of(folder: Path, names=None) -> dict[str, int]:
    """{path relative to the export root: bytes} of a format's files."""
    paths = [folder / n for n in names] if names else sorted(p for p in folder.rglob("*")
                                                             if p.is_file())
    return {str(p.relative_to(folder.parent)): p.stat().st_size for p in paths}


def release_open_clip(loaded, source: str, out_dir: Path, fp16: bool) -> Path:
    """open_clip folder with the student's weights only (no optimizer, no heads): from a run
    through training/export.py, else through the model's spec."""
    from training.checkpoint_files import find_tag_dir
    from training.export import export_checkpoint

    state = None
    if Path(source).is_dir() and not (Path(source) / "open_clip_config.json").is_file():
        export_checkpoint(find_tag_dir(source), out_dir)
        if fp16:
            from training.models import EXPORT_WEIGHTS_FILE, load_state_dict_file
            state = load_state_dict_file(out_dir / EXPORT_WEIGHTS_FILE)
    else:
        state = loaded.model.state_dict()
    if state is not None:
        if fp16:
            state = {k: v.half() for k, v in state.items()}
        loaded.spec.export(state, out_dir)
    return out_dir


def export_all(args, formats: list[str]) -> tuple[dict, list[str]]:
    """Write every format, check each against the PyTorch model; (card, parity failures)."""
    from training.deploy.card import build_card, write_card
    from training.deploy.parity import MIN_COSINE, below, compare, probe_batch
    from training.evaluation.loading import load_for_eval

    min_cosine = MIN_COSINE if args.min_cosine is None else args.min_cosine
    loaded = load_for_eval(args.source, args.model)
    if "hf" in formats:
        from training.deploy.huggingface import clip_config
        clip_config(loaded.spec)  # refuses a model CLIP cannot hold, before anything is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch = probe_batch(loaded.spec)
    candidates, card_formats, failures = {}, {}, []

    def check(name, model, files, dtype, held_to_bar):
        parity = compare(loaded.model, model, batch)
        card_formats[CARD_NAMES[name]] = {"dtype": dtype, "files": files, "parity": parity}
        candidates[CARD_NAMES[name]] = model
        if held_to_bar:
            failures.extend(f"{CARD_NAMES[name]}: {line}" for line in below(parity, min_cosine))

    if "openclip" in formats:
        folder = release_open_clip(loaded, args.source, out / "openclip", args.fp16)
        released = load_for_eval(str(folder))
        check("openclip", released.model, files_of(folder), "fp16" if args.fp16 else "fp32",
              held_to_bar=not args.fp16)
    if "onnx" in formats:
        from training.deploy.onnx import OnnxClip, export_onnx
        paths = export_onnx(loaded.model, loaded.spec, out / "onnx")
        check("onnx", OnnxClip(paths["image"], paths["text"]),
              files_of(out / "onnx", [p.name for p in paths.values()]), "fp32", True)
        if "int8" in formats:
            from training.deploy.quantize import quantize_dynamic_int8
            q = {k: quantize_dynamic_int8(p) for k, p in paths.items()}
            check("int8", OnnxClip(q["image"], q["text"]),
                  files_of(out / "onnx", [p.name for p in q.values()]), "int8", False)
    if "hf" in formats:
        from training.deploy.huggingface import HuggingFaceClip, export_huggingface
        folder = export_huggingface(loaded.model, loaded.spec, out / "huggingface")
        check("hf", HuggingFaceClip(folder), files_of(folder), "fp32", True)
    zeroshot = None
    if args.zeroshot:
        zeroshot = {"dataset": args.zeroshot, **zeroshot_by_format(
            {"pytorch": loaded.model, **candidates}, loaded.spec, args)}
    card = build_card(loaded, args.source, card_formats, zeroshot)
    write_card(card, out)
    return card, failures


def zeroshot_by_format(models: dict, spec, args) -> dict:
    """Zero-shot metrics of each model on --zeroshot (same transform, tokenizer, classes and
    templates), plus each format's top-1 agreement with the first model (the PyTorch one):
    the fraction of images whose predicted class is unchanged by the export, and how many
    distinct classes it predicts (1: a collapsed model, whose agreement says nothing)."""
    from training.evaluation.datasets import build_eval_loader, open_eval_set
    from training.evaluation.features import encode_loader
    from training.evaluation.suite import eval_transform
    from training.evaluation.zeroshot import (build_classifier, resolve_classnames,
                                              resolve_templates, zeroshot_metrics)

    eval_set = open_eval_set(args.zeroshot)
    names = resolve_classnames(None, eval_set.classnames)
    prompts = resolve_templates(None, eval_set.templates)
    transform = eval_transform(spec.preprocess_cfg)
    results, reference = {}, None
    for name, model in models.items():
        classifier = build_classifier(model, spec.tokenizer, names, prompts)
        loader = build_eval_loader(eval_set, transform, args.batch_size, 0, 0, 1,
                                   args.max_samples)
        features = encode_loader(model, loader, "cpu")
        predicted = (features.image_features @ classifier).argmax(1)
        reference = predicted if reference is None else reference
        results[name] = {**zeroshot_metrics(features.image_features, features.labels,
                                            classifier),
                         "top1_agreement": float((predicted == reference).double().mean()),
                         "predicted_classes": len(predicted.unique())}
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        formats = check_args(args)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        card, failures = export_all(args, formats)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"clip-export: error: {err}\n")
    for name, fmt in card["formats"].items():
        cells = " ".join(f"{t} cos {n['min_cosine']:.6f} maxdiff {n['max_abs_diff']:.2e}"
                         for t, n in fmt["parity"].items())
        top1 = (card["zeroshot"] or {}).get(name, {}).get("top1")
        print(f"{name:18s} {sum(fmt['files'].values()):>12,} bytes  {cells}"
              + ("" if top1 is None else f"  zero-shot top-1 {top1:.4f}"))
    print(f"card: {Path(args.out) / 'README.md'}")
    if failures:
        parser.exit(1, "clip-export: parity check failed: " + "; ".join(failures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
