"""The results of ``featkd bench PROTOCOL`` for people: the Markdown table and the plots (matplotlib optional).

Rows come from :func:`featkd.bench.stats.summarise`; the tuned table (:mod:`featkd.bench.tune`) uses the same
cell formatting.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from featkd.bench.protocol import Protocol
from featkd.bench.runner import Cell
from featkd.plotting import have_pyplot, require_pyplot

METRIC_LABELS = {"acc": "test acc", "miou": "test mIoU", "ap": "test box AP"}


def format_mean_se(mean: float | None, se: float | None, sign: bool = False) -> str:
    """``mean ± s.e.`` with two decimals (``sign``: a difference, +/- always shown); no s.e. part when it is
    unknown (one seed), empty without a mean."""
    if mean is None:
        return ""
    text = f"{mean:+.2f}" if sign else f"{mean:.2f}"
    return text + ("" if se is None or math.isnan(se) else f" ± {se:.2f}")


def format_paired(d: dict[str, Any] | None) -> str:
    """A paired difference: mean ± s.e. (wins/losses over the seeds)."""
    return "" if d is None else f"{format_mean_se(d['mean'], d['se'], sign=True)} ({d['wins']}/{d['losses']})"


def paired_columns(protocol: Protocol, rows: list[dict[str, Any]]) -> list[str]:
    """The paired baselines that have a row (rows written before the paired columns have no ``paired``)."""
    present = {r["method"] for r in rows if "paired" in r}
    return [b for b in protocol.paired_baselines() if b in present]


PAIRED_HEAD = "paired Δ vs {} (± s.e., wins/losses)"


def markdown(protocol: Protocol, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table of a plain protocol (rows of :func:`featkd.bench.stats.summarise`), with the command
    and the machine it ran on."""
    metric = rows[0]["metric"] if rows else "acc"
    marks = [m for m in protocol.epoch_marks if any(f"{metric}_epoch{m}_mean" in r for r in rows)]
    val = any(f"val_{metric}_mean" in r for r in rows)
    paired = paired_columns(protocol, rows)
    head = ["method", "seeds", *([f"val {metric} (mean ± s.e.)"] if val else []),
            f"{METRIC_LABELS.get(metric, metric)} (mean ± s.e.)", f"Δ vs {protocol.reference} (± s.e.)"]
    head += [PAIRED_HEAD.format(b) for b in paired]
    head += [f"{metric} after epoch {m}" for m in marks]
    head += ["train time / run", f"step time / {protocol.timing_reference}"]
    lines = [f"## {protocol.name}", "", protocol.description.strip(), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["seeds"])]
        cells += [format_mean_se(r.get(f"val_{metric}_mean"), r.get(f"val_{metric}_se"))] if val else []
        cells += [format_mean_se(r[f"{metric}_mean"], r[f"{metric}_se"]),
                  format_mean_se(r["delta_vs_ce"], r["delta_se"], sign=True)]
        cells += [format_paired(r.get("paired", {}).get(b)) for b in paired]
        cells += [format_mean_se(r.get(f"{metric}_epoch{m}_mean"), r.get(f"{metric}_epoch{m}_se")) for m in marks]
        ratio = r.get("step_time_ratio")
        cells += [f"{r['train_s']:.0f} s", "" if ratio is None else f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{meta['command']}`; {meta['environment']['torch_threads']} thread(s), "
              f"{meta['environment']['cpu_count']} CPU(s), {meta['environment']['date']}."]
    return "\n".join(lines) + "\n"


def plot(protocol: Protocol, rows: list[dict[str, Any]], cells: list[Cell], path_prefix: Path) -> list[Path]:
    """Accuracy per method with error bars, and test-accuracy-vs-epoch curves; none without matplotlib (the
    tables are the results, the plots an extra)."""
    if not have_pyplot():
        return []
    plt = require_pyplot("the benchmark plots")
    written = []
    metric = rows[0]["metric"]
    means, ses = [r[f"{metric}_mean"] for r in rows], [r[f"{metric}_se"] for r in rows]
    label_y = f"{METRIC_LABELS.get(metric, metric)} (%)"
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 2), 3.2))
    ax.bar([r["method"] for r in rows], means, yerr=[0 if math.isnan(e) else e for e in ses], capsize=3,
           color="#4C72B0")
    ax.set_ylim(max(0.0, min(means) - 3), min(100.0, max(means) + 1.5))
    ax.set_ylabel(label_y)
    ax.set_title(f"{protocol.name}: mean ± s.e. over seeds")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(f"{path_prefix}-accuracy.png", dpi=120)
    written.append(Path(f"{path_prefix}-accuracy.png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label in dict.fromkeys(c.label for c in cells):
        curves: dict[int, list[float]] = {}
        for c in cells:
            if c.label != label or not (c.out / "metrics.jsonl").is_file():
                continue
            for line in (c.out / "metrics.jsonl").read_text().splitlines():
                rec = json.loads(line)
                if f"test_{metric}" in rec:
                    curves.setdefault(rec["epoch"], []).append(rec[f"test_{metric}"])
        if curves:
            epochs = sorted(curves)
            ax.plot(epochs, [statistics.fmean(curves[e]) for e in epochs], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(label_y)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(f"{path_prefix}-curves.png", dpi=120)
    written.append(Path(f"{path_prefix}-curves.png"))
    plt.close(fig)
    return written
