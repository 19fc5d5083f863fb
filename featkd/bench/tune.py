"""``featkd bench PROTOCOL --tune``: every method's knobs swept on a validation split, the pick run on N seeds.

A tuned protocol is an ordinary protocol (:mod:`featkd.bench.protocol`) with a validation split (``val_fraction:``, or
``data.val_fraction`` in its base config) and a ``tune:`` section (:class:`featkd.bench.protocol.TuneSpec`)::

    val_fraction: 0.2
    seeds: 3                    # report seeds 0..2
    tune:
      seed: 100                 # the tuning seed: every trial trains with it
      reuse_seed: false         # true: the tuning seed must be a report seed; its report run is the pick's
      grid:
        none: {}                                            # no knobs: 1 trial (the config as it is)
        kd: {method.kd_temperature: [2, 4], method.kd_weight: [0.5, 2]}  # every combination: 4 trials
        fitnets: [{method.weight: 1}, {method.weight: 3}, {method.weight: 10}, {method.weight: 30}]

Every method with knobs has the same number of trials (checked when the protocol is loaded). Two phases, each
a resumable grid of ordinary ``featkd train`` processes (:func:`featkd.bench.runner.run_grid`: a finished cell is
not run again):

1. tuning: each trial on the tuning seed, in ``RUNS/<method>/trial<i>``;
2. report: each method's selected trial on the report seeds, in ``RUNS/<method>/seed<S>`` (with ``reuse_seed``
   the tuning seed's report run is the selected trial's own folder).

Selection rule: the trial with the highest **final-epoch validation** value of the task's metric
(``val_acc``) on the tuning seed; ties go to the first trial listed. A method's report runs start only when all
its trials have finished. The test split is never read for the selection: test values come from the report
runs only. Same seed, same data: a trial or seed changes only the student's init and data order (the subset
and validation split follow ``data.subset_seed``, which no trial may change).

Results: ``RESULTS/<protocol>.json`` (:func:`summarise`: the plain rows of :func:`featkd.bench.stats.summarise` over
the report runs, plus ``trials``, ``selected_trial``, ``selected_setting``, ``selection_val``; the top level
holds the rule, the seeds and the cost) and a Markdown table (:func:`markdown`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featkd.bench import stats
from featkd.bench.protocol import Protocol, check_tune, trial_overrides
from featkd.bench.report import METRIC_LABELS, PAIRED_HEAD, format_mean_se, format_paired, paired_columns
from featkd.bench.runner import Cell, cell_config, check_cells, run_grid
from featkd.errors import FeatkdError


def selection_rule(protocol: Protocol, metric: str = "acc") -> str:
    assert protocol.tune is not None
    return (f"highest final-epoch val_{metric} on the tuning seed {protocol.tune.seed} (ties: the first trial "
            "listed); the test split is not read for the selection")


def report_seeds(protocol: Protocol, n: int) -> list[int]:
    """Seeds 0..n-1; without ``reuse_seed`` the tuning seed must not be one of them, with it it must be."""
    assert protocol.tune is not None
    seeds, seed = list(range(n)), protocol.tune.seed
    if protocol.tune.reuse_seed and seed not in seeds:
        raise FeatkdError(f"protocol {protocol.name}: tune.reuse_seed: the tuning seed {seed} is not one of the "
                          f"report seeds 0..{n - 1}")
    if not protocol.tune.reuse_seed and seed in seeds:
        raise FeatkdError(f"protocol {protocol.name}: tune.seed {seed} is also a report seed (0..{n - 1}): pick a "
                          f"seed >= {n}, or set tune.reuse_seed: true")
    return seeds


def tuning_cells(protocol: Protocol, labels: Sequence[str], runs_dir: Path) -> dict[str, list[Cell]]:
    """Each method's trials on the tuning seed, validated (configs built) before anything trains."""
    assert protocol.tune is not None
    trials = check_tune(protocol)
    cells = {}
    for label in labels:
        config = cell_config(protocol, label, runs_dir)
        cells[label] = [Cell(label, config, protocol.tune.seed, runs_dir / label / f"trial{i}",
                             (*protocol.overrides(), *trial_overrides(setting)), trial=i)
                        for i, setting in enumerate(trials[label])]
        check_cells(cells[label])
        require_val(protocol, cells[label][0])
    return cells


def require_val(protocol: Protocol, cell: Cell) -> float:
    """The cell's ``data.val_fraction``; a tuned protocol without a validation split is an error."""
    from featkd.config import apply_overrides, build_config, load_raw

    cfg = build_config(apply_overrides(load_raw(cell.config), cell.overrides))
    if not cfg.data.val_fraction > 0:
        raise FeatkdError(f"protocol {protocol.name}: {cell.label} has no validation split to select on: set "
                          "val_fraction: in the protocol (the test split is never used for selection)")
    return cfg.data.val_fraction


@dataclass
class Selection:
    trial: int
    setting: dict[str, Any]
    val: float
    trials: list[dict[str, Any]]  # every trial: trial, setting, val_<metric>, train_s, run


def diverged(cell: Cell) -> bool:
    """A trial that diverged is an outcome of its setting (recorded, never selected, not run again)."""
    return cell.status() == "diverged"


def select(protocol: Protocol, cells: list[Cell]) -> Selection | None:
    """The selection rule (module docstring) over one method's trial cells; None until all have finished (or
    diverged), or when every trial diverged."""
    if not all(c.finished() or diverged(c) for c in cells):
        return None
    settings = check_tune(protocol)[cells[0].label]
    records, best = [], None
    for c in cells:
        summary = json.loads(c.summary_path.read_text())
        metric = summary.get("metric", "acc")
        record = {"trial": c.trial, "setting": settings[c.trial], "status": summary["status"],
                  f"val_{metric}": None, "train_s": summary["train_seconds"], "run": str(c.out)}
        records.append(record)
        if diverged(c):
            continue
        val = stats.final_val(c, summary)  # the final epoch's validation value: no test number is read here
        if val is None:
            raise FeatkdError(f"{c.out}: no val_{metric} at its final epoch (was it trained without a validation "
                              "split?)")
        record[f"val_{metric}"] = val
        if best is None or val > records[best][f"val_{metric}"]:  # strict: a tie keeps the earlier trial
            best = len(records) - 1
    if best is None:
        return None
    chosen = records[best]
    return Selection(chosen["trial"], chosen["setting"], chosen[f"val_{metric}"], records)


def report_cells(trials: list[Cell], selection: Selection, seeds: Sequence[int], runs_dir: Path) -> list[Cell]:
    """The selected trial on every report seed (the tuning seed's run is the trial's own with ``reuse_seed``)."""
    picked = trials[selection.trial]
    return [Cell(picked.label, picked.config, seed,
                 picked.out if seed == picked.seed else runs_dir / picked.label / f"seed{seed}", picked.overrides)
            for seed in seeds]


@dataclass
class TunedRun:
    trials: dict[str, list[Cell]]
    selections: dict[str, Selection | None]
    report: dict[str, list[Cell]]
    outcomes: list[tuple[Cell, int, str]] = field(default_factory=list)

    def report_cells(self) -> list[Cell]:
        return [c for cells in self.report.values() for c in cells]


def run(protocol: Protocol, labels: Sequence[str], seeds: int, runs_dir: Path, jobs: int = 1,
        extra: Sequence[str] = (), train: bool = True, log: Callable[[str], None] = print) -> TunedRun:
    """Both phases (module docstring); ``train`` False: only what has finished (``--report``)."""
    report_at = report_seeds(protocol, seeds)
    trials = tuning_cells(protocol, labels, runs_dir)
    outcomes = []
    if train:
        log(f"tuning: {sum(map(len, trials.values()))} trial runs on seed {protocol.tune.seed}")
        todo = [c for label in labels for c in trials[label] if not diverged(c)]
        outcomes += run_grid(todo, jobs, extra, log)
    selections = {label: select(protocol, trials[label]) for label in labels}
    report = {}
    for label, sel in selections.items():
        if sel is None:
            every = all(diverged(c) for c in trials[label])
            log(f"{label}: {'every trial diverged' if every else 'not every trial has finished'}; no report runs")
            continue
        metric = next(k for k in sel.trials[0] if k.startswith("val_"))
        vals = ", ".join("diverged" if t[metric] is None else f"{t[metric]:.2f}" for t in sel.trials)
        log(f"{label}: selected trial {sel.trial} ({setting_text(sel.setting)}), {metric} {sel.val:.2f} "
            f"(trials: {vals})")
        report[label] = report_cells(trials[label], sel, report_at, runs_dir)
    if train:
        log(f"report: the selected settings on seeds {', '.join(map(str, report_at))}")
        outcomes += run_grid([c for cells in report.values() for c in cells], jobs, extra, log)
    return TunedRun(trials, selections, report, outcomes)


def cost(tuned: TunedRun) -> dict[str, Any]:
    """Runs done (finished or diverged) and the sum of their train_seconds (one thread each: about CPU-core
    seconds), per phase."""
    def seconds(cells: list[Cell]) -> tuple[int, float]:
        done = [c for c in cells if c.finished() or diverged(c)]
        return len(done), sum(json.loads(c.summary_path.read_text())["train_seconds"] for c in done)

    trial_cells = [c for cells in tuned.trials.values() for c in cells]
    trial_dirs = {c.out for c in trial_cells}
    n_t, s_t = seconds(trial_cells)
    n_r, s_r = seconds([c for c in tuned.report_cells() if c.out not in trial_dirs])  # a reused seed: once
    return {"tuning_cells": n_t, "report_cells": n_r, "cells": n_t + n_r, "tuning_cell_seconds": s_t,
            "report_cell_seconds": s_r, "cell_seconds": s_t + s_r}


def summarise(protocol: Protocol, tuned: TunedRun) -> list[dict[str, Any]]:
    """:func:`featkd.bench.stats.summarise` over the report runs, each row with its trials and selection."""
    rows = stats.summarise(protocol, tuned.report_cells())
    for row in rows:
        sel = tuned.selections[row["method"]]
        assert sel is not None
        row.update(trials=sel.trials, selected_trial=sel.trial, selected_setting=sel.setting,
                   selection_val=sel.val, tuning_seed=protocol.tune.seed if protocol.tune else None)
    return rows


def setting_text(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('method.')}={v}" for k, v in setting.items()) or "config as is"


def markdown(protocol: Protocol, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The tuned table: selection, val and test per method, unpaired and paired deltas; then every trial."""
    metric = rows[0]["metric"] if rows else "acc"
    paired = paired_columns(protocol, rows)
    head = ["method", "trials", "selected", f"val {metric} at selection", "seeds", f"val {metric} (mean ± s.e.)",
            f"{METRIC_LABELS.get(metric, metric)} (mean ± s.e.)", f"Δ vs {protocol.reference} (± s.e.)",
            *(PAIRED_HEAD.format(b) for b in paired), "train time / run",
            f"step time / {protocol.timing_reference}"]
    c = meta["cost"]
    lines = [f"## {protocol.name} (tuned)", "", protocol.description.strip(), "",
             f"Selection: {meta['selection_rule']}. Report seeds: {', '.join(map(str, meta['report_seeds']))}"
             f"{' (the tuning seed reused)' if meta['reuse_seed'] else ' (distinct from the tuning seed)'}; "
             f"validation split: data.val_fraction {meta['val_fraction']} of the training split.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = r.get("step_time_ratio")
        cells = [r["method"], str(len(r["trials"])), setting_text(r["selected_setting"]), f"{r['selection_val']:.2f}",
                 str(r["seeds"]), format_mean_se(r.get(f"val_{metric}_mean"), r.get(f"val_{metric}_se")),
                 format_mean_se(r[f"{metric}_mean"], r[f"{metric}_se"]),
                 format_mean_se(r["delta_vs_ce"], r["delta_se"], sign=True),
                 *(format_paired(r["paired"].get(b)) for b in paired),
                 f"{r['train_s']:.0f} s", "" if ratio is None else f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    width = max((len(r["trials"]) for r in rows), default=0)
    lines += ["", f"Trials: final-epoch val {metric} on the tuning seed {meta['tuning_seed']} (selected in bold).", "",
              "| method | " + " | ".join(f"trial {i}" for i in range(width)) + " |", "|" + "---|" * (width + 1)]
    for r in rows:
        texts = []
        for t in r["trials"]:
            val = t[f"val_{metric}"]
            text = f"{setting_text(t['setting'])}: {'diverged' if val is None else f'{val:.2f}'}"
            texts.append(f"**{text}**" if t["trial"] == r["selected_trial"] else text)
        lines.append("| " + " | ".join([r["method"], *texts, *[""] * (width - len(texts))]) + " |")
    lines += ["", f"Cost: {c['cells']} runs ({c['tuning_cells']} tuning, {c['report_cells']} report), sum of their "
              f"train times {c['cell_seconds']:.0f} s ({c['cell_seconds'] / 3600:.2f} h, one thread per run); wall "
              f"{meta['wall_seconds']:.0f} s for this invocation.",
              f"Command: `{meta['command']}`; {meta['environment']['torch_threads']} thread(s), "
              f"{meta['environment']['cpu_count']} CPU(s), {meta['environment']['date']}."]
    return "\n".join(lines) + "\n"


def _config_epochs(config: str, extra: Sequence[str] = ()) -> int | None:
    from featkd import resources
    from featkd.config import apply_overrides, load_raw

    path = Path(config)
    if not path.is_file():  # a results file from another clone: the shipped config of the same name
        path = resources.data_root() / "configs" / path.name
        if not path.is_file():
            return None
    raw = apply_overrides(load_raw(path), extra)
    return int(raw.get("train", {}).get("epochs", 0)) or None


def estimate(protocol: Protocol, labels: Sequence[str], seeds: int, reference: str | Path,
             extra: Sequence[str] = ()) -> dict[str, Any]:
    """Expected cost of the (tuned or plain) grid from the per-run ``train_s`` of the rows of another results
    file, scaled by epochs; a method without a row there costs as the protocol's timing reference row. The
    runs' set-up (DFA's search, MGD's first matching) is not in ``train_s`` and not in the estimate."""
    ref = json.loads(Path(reference).read_text())
    rows = {r["method"]: r for r in ref["rows"]}
    if protocol.timing_reference not in rows:
        raise FeatkdError(f"{reference}: no row {protocol.timing_reference!r} (the protocol's timing reference)")
    per_method = {}
    if protocol.tune is not None:
        counts = {label: len(check_tune(protocol)[label]) + seeds - int(protocol.tune.reuse_seed)
                  for label in labels}
    else:
        counts = {label: seeds for label in labels}
    for label in labels:
        row = rows.get(label, rows[protocol.timing_reference])
        epochs = _config_epochs(protocol.base or protocol.methods[label], extra)  # writes nothing into runs_dir
        ref_epochs = _config_epochs(row.get("config", ""))
        scale = epochs / ref_epochs if epochs and ref_epochs else 1.0
        per_run = row["train_s"] * scale
        per_method[label] = {"runs": counts[label], "per_run_s": per_run, "from_row": row["method"],
                             "epochs": epochs, "row_epochs": ref_epochs, "total_s": per_run * counts[label]}
    total = sum(m["total_s"] for m in per_method.values())
    return {"reference": str(reference), "runs": sum(counts.values()), "cell_seconds": total,
            "per_method": per_method}


def estimate_text(est: dict[str, Any], jobs: int) -> str:
    lines = [f"{'method':<12} {'runs':>4} {'s/run':>7} {'from row':<14} epochs"]
    for label, m in est["per_method"].items():
        lines.append(f"{label:<12} {m['runs']:>4} {m['per_run_s']:>7.0f} {m['from_row']:<14} "
                     f"{m['epochs']} (row: {m['row_epochs']})")
    total = est["cell_seconds"]
    lines.append(f"estimate: {est['runs']} runs, {total:.0f} s of runs ({total / 3600:.2f} h at one thread each), "
                 f"about {total / max(1, jobs) / 3600:.2f} h wall with {jobs} job(s) (from the train_s of "
                 f"{est['reference']}; set-up such as DFA's search is extra)")
    return "\n".join(lines)
