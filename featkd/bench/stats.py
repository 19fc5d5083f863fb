"""Statistics over a protocol's finished runs: one results row per method (pure: reads run folders only).

A row (``benchmarks/results/<protocol>.json``): ``method``, ``seeds``, ``metric`` (the task's: ``acc``,
``miou``), ``<metric>_mean``, ``<metric>_se``, ``delta_vs_ce``, ``delta_se``, ``train_s``, ``seed_ids``,
``paired``, ... Accuracy is each run's final-epoch test accuracy (never the best epoch: that would select on the
test set); s.e. = sample standard deviation / sqrt(seeds).

Paired columns: every method runs the same seeds, and one seed is one training subset (``data.subset_seed`` is
the config's, not the seed), one validation split, one student init and one data order for every method, so
``paired[b]`` is the mean +- s.e. of the per-seed differences to row ``b`` (the reference and ``kd`` unless the
protocol's ``paired:`` says otherwise), with the wins / losses over those seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from featkd.bench.protocol import Protocol
from featkd.bench.runner import Cell


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); NaN for a single value: no spread to estimate)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def epoch_metric(out: Path, epoch: int, metric: str, split: str = "test") -> float | None:
    """``<split>_<metric>`` after ``epoch`` from a run's metrics.jsonl (None where it was not evaluated)."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return None
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("epoch") == epoch and f"{split}_{metric}" in rec:
            return rec[f"{split}_{metric}"]
    return None


def final_val(cell: Cell, summary: dict[str, Any]) -> float | None:
    """A finished run's final-epoch validation value of its metric (None without a validation split)."""
    metric = summary_metric(summary)[0]
    return epoch_metric(cell.out, summary["epochs"], metric, "val")


def paired_delta(values: dict[int, float], base: dict[int, float]) -> dict[str, Any] | None:
    """Per-seed differences ``values[s] - base[s]`` over the seeds both have: n, mean, s.e., wins, losses."""
    seeds = sorted(set(values) & set(base))
    if not seeds:
        return None
    diffs = [values[s] - base[s] for s in seeds]
    mean, se = mean_se(diffs)
    return {"n": len(seeds), "mean": mean, "se": se, "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs), "seeds": seeds}


def summary_metric(summary: dict[str, Any]) -> tuple[str, float]:
    """(metric name, final test value) of a run's summary.json (older summaries have test_acc only)."""
    metric = summary.get("metric", "acc")
    return metric, summary.get("test_metric", summary.get(f"test_{metric}"))


def summarise(protocol: Protocol, cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per method from the finished cells' summaries."""
    rows = []
    by_label: dict[str, list[Cell]] = {}
    for c in cells:
        by_label.setdefault(c.label, []).append(c)
    for label, group in by_label.items():
        done = [c for c in group if c.finished()]
        summaries = [json.loads(c.summary_path.read_text()) for c in done]
        if not summaries:
            continue
        metric = summary_metric(summaries[0])[0]
        accs = [summary_metric(s)[1] for s in summaries]
        mean, se = mean_se(accs)
        row: dict[str, Any] = {
            "method": label, "config": group[0].config, "seeds": len(accs), "metric": metric, f"{metric}s": accs,
            f"{metric}_mean": mean, f"{metric}_se": se,
            "train_s": statistics.fmean(s["train_seconds"] for s in summaries),
            f"teacher_test_{metric}": summaries[0].get("teacher_test_metric", summaries[0].get("teacher_test_acc")),
            "seed_ids": [c.seed for c in done],  # the seed of each value in f"{metric}s"
        }
        vals = [final_val(c, s) for c, s in zip(done, summaries, strict=True)]
        if all(v is not None for v in vals):  # the protocol has a validation split
            row[f"val_{metric}s"] = vals
            row[f"val_{metric}_mean"], row[f"val_{metric}_se"] = mean_se(vals)
        for mark in protocol.epoch_marks:
            marks = [a for c in group if (a := epoch_metric(c.out, mark, metric)) is not None]
            if marks:
                row[f"{metric}_epoch{mark}_mean"], row[f"{metric}_epoch{mark}_se"] = mean_se(marks)
        rows.append(row)
    ref = next((r for r in rows if r["method"] == protocol.reference), None)
    for r in rows:
        if ref is None:
            r["delta_vs_ce"] = r["delta_se"] = None
        else:
            m = r["metric"]
            r["delta_vs_ce"] = r[f"{m}_mean"] - ref[f"{m}_mean"]
            r["delta_se"] = math.sqrt(r[f"{m}_se"] ** 2 + ref[f"{m}_se"] ** 2) if r is not ref else 0.0
    add_paired(protocol, rows)
    return rows


def add_paired(protocol: Protocol, rows: list[dict[str, Any]]) -> None:
    """``row["paired"][b]``: :func:`paired_delta` of each row's per-seed test values against row ``b``'s."""
    per_seed = {r["method"]: dict(zip(r["seed_ids"], r[f"{r['metric']}s"], strict=True)) for r in rows}
    for r in rows:
        r["paired"] = {b: d for b in protocol.paired_baselines()
                       if b != r["method"] and b in per_seed
                       and (d := paired_delta(per_seed[r["method"]], per_seed[b])) is not None}
