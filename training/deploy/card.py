"""The model card written into every export: README.md (for people) and card.json (the same
numbers, for programs and tests).

Every number is read from a record, never re-derived: the run's checkpoint run.json (step,
world size, the resolved config), done.json (samples seen), metrics.jsonl (the last evaluation),
the inheritance record beside `model.student_init` (inheritance.json), the shard sets'
manifest.json (counts, shard hashes), the teacher's weights file (sha256); plus what the export
measured (parameters and MACs per tower, files and sizes, parity and zero-shot per format).

    card = build_card(loaded, source, formats, zeroshot)   # dict
    write_card(card, out_dir)                             # card.json + README.md
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from training.checkpoint_files import LATEST, find_tag_dir, read_run_record
from training.config import STUDENT_INIT_TEACHER
from training.files import write_json_atomic, write_text_atomic
from training.inheritance.record import RECORD_FILE, file_sha256, weights_file_of

CARD_JSON, CARD_MD = "card.json", "README.md"


def run_dir_of(source: str | os.PathLike) -> Path | None:
    """The run directory a source came from: a run dir, one of its checkpoint tags, or its
    export/ folder; None for a folder with no run beside it."""
    path = Path(source)
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "checkpoints" / LATEST).is_file():
            return candidate
    return None


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def last_evaluation(run_dir: Path) -> dict | None:
    """The last eval/* record of metrics.jsonl: {"step", metric: value}."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    evals = [r for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))
             if any(k.startswith("eval/") for k in r)]
    if not evals:
        return None
    last = evals[-1]
    return {"step": last["step"], **{k.removeprefix("eval/"): v for k, v in last.items()
                                     if k.startswith("eval/")}}


def shard_sets(train: str) -> list[dict]:
    """Each data.train source's manifest.json: counts, shard count and the manifest's hash
    (which covers every shard's sha256)."""
    from braceexpand import braceexpand

    sets = []
    for source in train.split("::"):
        first = next(iter(braceexpand(source.strip())))
        manifest_path = Path(first).parent / "manifest.json"
        entry = {"shards": source.strip(), "manifest": str(manifest_path)}
        manifest = _read_json(manifest_path)
        if manifest is not None:
            entry.update(manifest_sha256=file_sha256(manifest_path),
                         source=manifest.get("source"), written=manifest.get("written"),
                         skipped=manifest.get("skipped"), num_shards=len(manifest["shards"]))
        sets.append(entry)
    return sets


def teacher_of(model_cfg: dict) -> dict | None:
    if not model_cfg.get("teacher"):
        return None
    weights = weights_file_of(model_cfg.get("teacher_pretrained"))
    return {"model": model_cfg["teacher"], "pretrained": model_cfg.get("teacher_pretrained"),
            "weights_sha256": file_sha256(weights) if weights else None}


def inheritance_of(student_init: str | None) -> dict | None:
    """The inheritance record beside the student's init weights, and whether those weights are
    the ones it describes."""
    if not student_init:
        return None
    if student_init == STUDENT_INIT_TEACHER:  # inherited in-process: no file, no record
        return {"student_init": student_init, "record": None}
    record = _read_json(Path(student_init).parent / RECORD_FILE)
    entry = {"student_init": student_init}
    if record is None:
        return {**entry, "record": None}
    init_sha = file_sha256(student_init) if Path(student_init).is_file() else None
    return {**entry, "record": str(Path(student_init).parent / RECORD_FILE),
            "inputs": record.get("inputs"), "weights_sha256": record["weights"]["sha256"],
            "init_matches_record": init_sha == record["weights"]["sha256"]}


def training_record(run_dir: Path) -> dict:
    tag_dir = find_tag_dir(run_dir)
    run = read_run_record(tag_dir)
    model_cfg = run["config"]["model"]
    done = _read_json(run_dir / "done.json")
    return {"run_dir": str(run_dir), "checkpoint": tag_dir.name, "step": run["step"],
            "total_steps": run["total_steps"], "world_size": run["world_size"],
            "zero_stage": run["zero_stage"],
            "precision": run["config"].get("deepspeed", {}).get("precision"),
            "completed": done is not None,
            "samples_seen": done.get("samples_seen") if done else None,
            "loss": run["config"].get("loss"),
            "teacher": teacher_of(model_cfg),
            "inheritance": inheritance_of(model_cfg.get("student_init")),
            "data": shard_sets(run["config"]["data"]["train"]),
            "evaluation": last_evaluation(run_dir)}


def build_card(loaded, source: str, formats: dict, zeroshot: dict | None) -> dict:
    """The card's numbers: architecture and cost, training provenance, formats."""
    from training.evaluation.cost import model_cost

    run_dir = run_dir_of(source)
    return {"model": loaded.name, "source": str(source),
            "architecture": loaded.spec.model_cfg,
            "cost": model_cost(loaded.model, batch_size=None),
            "preprocess": loaded.spec.preprocess_cfg,
            "context_length": loaded.spec.tokenizer.context_length,
            "training": training_record(run_dir) if run_dir else None,
            "formats": formats, "zeroshot": zeroshot}


def render(card: dict) -> str:
    """The card as markdown."""
    cost, lines = card["cost"], []
    add = lines.append
    add(f"# {card['model']}: a distilled CLIP student\n")
    add(f"Exported by `clip-export` from `{card['source']}`.\n")
    add("## Architecture\n")
    add("| tower | parameters | MACs per sample |\n|---|---|---|")
    add(f"| image | {cost['image_params']:,} | {cost['image_macs']:,} |")
    add(f"| text | {cost['text_params']:,} ({cost['text_params_no_token_embedding']:,} without "
        f"the token embedding) | {cost['text_macs']:,} |")
    add(f"\nConfig: `{json.dumps(card['architecture'], sort_keys=True)}`; image size "
        f"{card['preprocess']['size']}, context length {card['context_length']}.\n")
    training = card["training"]
    add("## Training\n")
    if training is None:
        add("No run directory beside the source: training provenance not available.\n")
    else:
        add(f"- run: `{training['run_dir']}`, checkpoint `{training['checkpoint']}`: step "
            f"{training['step']} of {training['total_steps']}, "
            f"{'completed' if training['completed'] else 'not completed'}, samples seen "
            f"{training['samples_seen']}, world size {training['world_size']}, ZeRO "
            f"{training['zero_stage']}, {training['precision']}")
        teacher = training["teacher"]
        add(f"- teacher: {'none' if teacher is None else teacher['model']}"
            + ("" if teacher is None else f", weights `{teacher['pretrained']}` sha256 "
               f"`{teacher['weights_sha256']}`"))
        inh = training["inheritance"]
        add(f"- inheritance: {'none (random init)' if inh is None else inh.get('record')}"
            + ("" if not inh or not inh.get("record") else
               f", weights sha256 `{inh['weights_sha256']}` (init file matches: "
               f"{inh['init_matches_record']}), inputs `{json.dumps(inh['inputs'], sort_keys=True)}`"))
        add(f"- loss: `{json.dumps(training['loss'], sort_keys=True)}`")
        for data in training["data"]:
            add(f"- data: `{data['shards']}`: {data.get('written')} samples in "
                f"{data.get('num_shards')} shards (skipped {data.get('skipped')}), manifest "
                f"sha256 `{data.get('manifest_sha256')}`")
        ev = training["evaluation"]
        add("- evaluation during training: " + ("none" if ev is None else f"step {ev['step']}: "
            + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in ev.items() if k != "step")))
        add("")
    add("## Formats\n")
    add("| format | files (bytes) | image min cos | image max abs diff | text min cos | "
        "text max abs diff | zero-shot top-1 |\n|---|---|---|---|---|---|---|")
    for name, fmt in card["formats"].items():
        parity = fmt.get("parity") or {}
        image, text = parity.get("image", {}), parity.get("text", {})
        top1 = (card["zeroshot"] or {}).get(name, {}).get("top1")
        cells = [f"{image.get('min_cosine', float('nan')):.6f}",
                 f"{image.get('max_abs_diff', float('nan')):.2e}",
                 f"{text.get('min_cosine', float('nan')):.6f}",
                 f"{text.get('max_abs_diff', float('nan')):.2e}"] if parity else ["-"] * 4
        files = ", ".join(f"`{f}` ({b:,})" for f, b in fmt["files"].items())
        add(f"| {name} | {files} | {' | '.join(cells)} | "
            f"{'-' if top1 is None else f'{top1:.4f}'} |")
    if card["zeroshot"]:
        reference = card["zeroshot"]["pytorch"]
        add(f"\nZero-shot set: `{card['zeroshot'].get('dataset')}`: the PyTorch model's top-1 "
            f"{reference['top1']:.4f} ({reference['predicted_classes']} distinct classes "
            f"predicted); each format's agreement with its predictions is in card.json.")
    add("\nParity is against the PyTorch model on a fixed probe batch; fp32 formats must reach "
        "cosine 0.9999.")
    return "\n".join(lines) + "\n"


def write_card(card: dict, out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / CARD_JSON, card, indent=2)
    write_text_atomic(out_dir / CARD_MD, render(card))
    return out_dir / CARD_MD
