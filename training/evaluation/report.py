"""Run reports: PNG curves from one or several RUN_DIR/metrics.jsonl, and evaluation tables.

metrics.jsonl holds one JSON object per line with a "step"; training lines carry losses
("loss", "loss_*"), "lr", "samples_per_s", ...; evaluation lines carry "eval/..." keys
(training.metrics.MetricsLogger). Any key may be missing and unreadable lines are counted
and skipped, so a report renders from a run that was cut short or an older format.

`write_report(run_dirs, out_dir)` writes training.png (losses, learning rate, throughput),
eval.png (one panel per evaluation metric), table.md and report.md. `zoo_row(record)` renders
one `clip-eval eval` record as a row of the TinyCLIP model-zoo table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

RANK_SUFFIXES = ("_median_rank", "_mean_rank")
TABLE_METRICS = ("eval/zeroshot/top1", "eval/zeroshot/top5", "eval/zeroshot/mean_per_class_recall",
                 "eval/val/image_to_text_R@1", "eval/val/text_to_image_R@1",
                 "eval/val/image_to_text_R@5", "eval/val/text_to_image_R@5")


@dataclass
class RunMetrics:
    """One run's series: key -> ([steps], [values]); eval keys keep their "eval/" prefix."""

    label: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    bad_lines: int = 0

    def add(self, key: str, step: int, value: float) -> None:
        steps, values = self.series.setdefault(key, ([], []))
        steps.append(step)
        values.append(value)

    def last(self, key: str) -> float | None:
        return self.series[key][1][-1] if key in self.series else None


def read_metrics(run_dir: str | Path, label: str | None = None) -> RunMetrics:
    """Parse RUN_DIR/metrics.jsonl (or a .jsonl path); numeric values only, per key."""
    path = Path(run_dir)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path}: no metrics.jsonl")
    run = RunMetrics(label or (path.parent.name if path.name == "metrics.jsonl" else path.stem))
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            run.bad_lines += line.strip() != ""
            continue
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                run.add(key, step, float(value))
    return run


def _panels_training(runs: list[RunMetrics]) -> list[tuple[str, list[str], bool]]:
    """(title, keys, y scale factor) for the training figure: losses, lr, throughput, scale."""
    keys = sorted({k for r in runs for k in r.series if not k.startswith("eval/")})
    from training.objectives import TERMS  # the loss terms' names (training/objectives)
    terms = ["loss"] + sorted(TERMS)
    losses = [k for k in terms if k in keys] + [
        k for k in keys if k.startswith("loss") and k not in terms]
    panels = [(k if k.startswith("loss") else f"loss term: {k}", [k], 1.0) for k in losses]
    panels += [(title, [k], 1.0) for title, k in (
        ("learning rate", "lr"), ("throughput (samples/s)", "samples_per_s"),
        ("logit scale", "logit_scale")) if k in keys]
    return panels


def _eval_order(key: str) -> tuple:
    """zero-shot before retrieval, then top1/top5/recall/R@1/R@5/R@10 in that order."""
    task, _, metric = key.removeprefix("eval/").rpartition("/")
    order = ("top1", "top5", "mean_per_class_recall", "image_to_text_R@1", "image_to_text_R@5",
             "image_to_text_R@10", "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10")
    return (task != "zeroshot", task, order.index(metric) if metric in order else 99, metric)


def _panels_eval(runs: list[RunMetrics]) -> list[tuple[str, list[str], float]]:
    """One panel per evaluation metric, in percent (ranks and skip counts left out)."""
    keys = sorted({k for r in runs for k in r.series if k.startswith("eval/")
                   and not k.endswith(RANK_SUFFIXES) and "skipped" not in k}, key=_eval_order)
    return [(k.removeprefix("eval/") + " (%)", [k], 100.0) for k in keys]


def plot_panels(runs: list[RunMetrics], panels, out_png: Path, title: str) -> Path | None:
    """A grid of panels, each run one coloured line; None when no panel has data."""
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (name, keys, scale) in zip(axes.flat, panels):
        for colour, run in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, runs):
            for key in keys:
                if key in run.series:
                    steps, values = run.series[key]
                    ax.plot(steps, [scale * v for v in values], color=colour, label=run.label,
                            marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(runs) > 1 and handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(runs), 6),
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(title, y=1.04 if len(runs) > 1 else 1.0)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def runs_table(runs: list[RunMetrics]) -> str:
    """Markdown: per run, the last evaluation values (percent), last step, last throughput."""
    present = [k for k in TABLE_METRICS if any(k in r.series for r in runs)]
    header = ["run", "last step"] + [k.removeprefix("eval/") + " (%)" for k in present] \
        + ["samples/s", "final loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        last_step = max((s[0][-1] for s in run.series.values()), default=0)
        throughput, loss = run.last("samples_per_s"), run.last("loss")
        cells = [run.label, str(last_step)] + [_percent(run.last(k)) for k in present] + [
            "-" if throughput is None else f"{throughput:.1f}",
            "-" if loss is None else f"{loss:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str | Path], out_dir: str | Path,
                 labels: list[str] | None = None) -> dict[str, Path]:
    """Render the plots and tables of `run_dirs` into `out_dir`; returns the files written."""
    if labels and len(labels) != len(run_dirs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(run_dirs)} runs")
    runs = [read_metrics(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, panels, title in (("training", _panels_training(runs), "training"),
                                ("eval", _panels_eval(runs), "evaluation")):
        png = plot_panels(runs, panels, out / f"{name}.png", title)
        if png:
            written[name] = png
    table = runs_table(runs)
    (out / "table.md").write_text(table)
    written["table"] = out / "table.md"
    images = "".join(f"![{k}]({p.name})\n\n" for k, p in written.items() if p.suffix == ".png")
    skipped = "".join(f"\n{r.label}: {r.bad_lines} unreadable metrics.jsonl lines skipped\n"
                      for r in runs if r.bad_lines)
    (out / "report.md").write_text(f"# Run report\n\nRuns: {', '.join(str(d) for d in run_dirs)}"
                                   f"\n\n{images}## Evaluation\n\n{table}{skipped}")
    written["report"] = out / "report.md"
    return written


# ----------------------------------------------------------------- clip-eval records -> zoo rows

ZOO_HEADER = ("| Model | Checkpoint | Params image + text (M) | Zero-shot Acc@1 (%) | Acc@5 (%) | "
              "I2T R@1 (%) | T2I R@1 (%) | MACs image + text (G) | Throughput (pairs/s) |\n"
              "|---|---|---|---|---|---|---|---|---|\n")


def tinyclip_name(record: dict) -> str:
    """TinyCLIP's naming: ViT-{image M}/{patch}-Text-{text M without token embedding}."""
    cost = record.get("cost") or {}
    if "image_params" not in cost:
        return Path(str(record.get("model", "?")).removeprefix("local-dir:")).name
    patch = cost.get("patch_size")
    image = f"{cost['image_params'] / 1e6:.0f}M" if cost["image_params"] >= 1e6 \
        else f"{cost['image_params'] / 1e6:.2f}M"
    text = cost["text_params_no_token_embedding"] / 1e6
    text = f"{text:.0f}M" if text >= 1 else f"{text:.2f}M"
    return f"ViT-{image}{f'/{patch}' if patch else ''}-Text-{text}"


def zoo_row(record: dict) -> str:
    """One markdown row (no header) of the model-zoo table for a `clip-eval eval` record."""
    zs, ret, cost = (record.get(k) or {} for k in ("zeroshot", "retrieval", "cost"))

    def pct(d, k):
        return _percent(d.get(k)) if k in d else "-"
    params = (f"{cost['image_params'] / 1e6:.2f} + {cost['text_params'] / 1e6:.2f}"
              if "image_params" in cost else "-")
    macs = (f"{cost['image_macs'] / 1e9:.3f} + {cost['text_macs'] / 1e9:.3f}"
            if "image_macs" in cost else "-")
    pairs = f"{cost['pairs_per_s']:,.0f}" if "pairs_per_s" in cost else "-"
    cells = [tinyclip_name(record), Path(str(record.get("checkpoint") or "random init")).name,
             params, pct(zs, "top1"), pct(zs, "top5"), pct(ret, "image_to_text_R@1"),
             pct(ret, "text_to_image_R@1"), macs, pairs]
    return "| " + " | ".join(cells) + " |\n"
