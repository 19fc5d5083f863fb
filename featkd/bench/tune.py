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

Converging grids (``tune.extend: N``): after the tuning runs, a method whose pick sits at an end of a numeric
axis of its grid (a key of a ``{key: [values]}`` grid, through the pick; or the whole ladder of a list grid)
gets the next value beyond that end, at the grid's own ratio there (``end * end / neighbour``; a step of the
same size when the two differ in sign), as a new trial ``trial<i>`` on the tuning seed; then the selection runs
again, for at most N rounds per method. A diverged trial is a point of the grid (the pick next to it is
inside). The extensions, the bound and any pick still at an open edge are in the results.

Teacher cache (``tune.teacher_cache``, default on): tuning trials run with ``train.teacher_cache
RUNS/teacher-cache``; the trials of one method share a stream, so the first writes the teacher's per-step
outputs and the others read them (results unchanged: :mod:`featkd.engine.teacher_cache`). Trials start
round-robin over the methods (every method's trial 0 first), so a method's first trial has written its stream
before its second starts.

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

import dataclasses
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
    """Each method's grid trials on the tuning seed, validated (configs built) before anything trains."""
    assert protocol.tune is not None
    trials = check_tune(protocol)
    cells = {}
    for label in labels:
        config = cell_config(protocol, label, runs_dir)
        cells[label] = [trial_cell(protocol, label, config, i, setting, runs_dir)
                        for i, setting in enumerate(trials[label])]
        check_cells(cells[label])
        require_val(protocol, cells[label][0])
    return cells


def trial_cell(protocol: Protocol, label: str, config: str, index: int, setting: dict[str, Any],
               runs_dir: Path) -> Cell:
    assert protocol.tune is not None
    cache = runs_dir / "teacher-cache" if protocol.tune.teacher_cache else None
    return Cell(label, config, protocol.tune.seed, runs_dir / label / f"trial{index}",
                (*protocol.overrides(), *trial_overrides(setting)), trial=index, teacher_cache=cache)


def round_robin(cells: dict[str, list[Cell]]) -> list[Cell]:
    """Every method's first trial, then every method's second...: a method's first trial writes the teacher
    cache before its next one starts reading it."""
    width = max(map(len, cells.values()), default=0)
    return [c[i] for i in range(width) for c in cells.values() if i < len(c)]


# ---- converging grids ----------------------------------------------------------------------------------------

@dataclass
class Extension:
    """A trial added beyond an end of a method's grid (module docstring)."""

    trial: int
    setting: dict[str, Any]
    axis: str  # the key it moves; "*": every key of a list grid (its ladder)
    end: str  # "low" (before the first value) or "high" (after the last)
    round: int  # 1 = the first extension round


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def grid_axes(entry: Any) -> list[str]:
    """The axes of a ``tune.grid`` entry that can be extended: each key of a ``{key: [values]}`` grid with two
    or more numeric values; ``"*"`` (the ladder) for a list of two or more settings."""
    if isinstance(entry, dict):
        return [k for k, v in entry.items() if len(v) > 1 and all(map(is_number, v))]
    return ["*"] if isinstance(entry, list) and len(entry) > 1 else []


def axis_line(axis: str, grid: list[dict[str, Any]], extensions: list[Extension],
              selected: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials along ``axis`` through the selected setting, ordered: a key's values sorted (the trials equal
    to the selected one on every other key); the ladder in its order, extensions at its ends."""
    if axis == "*":
        lows = [e.setting for e in extensions if e.axis == "*" and e.end == "low"]
        highs = [e.setting for e in extensions if e.axis == "*" and e.end == "high"]
        return [*reversed(lows), *grid, *highs]
    trials = [*grid, *(e.setting for e in extensions)]
    on_line = [t for t in trials if all(t.get(k) == v for k, v in selected.items() if k != axis)]
    return sorted(on_line, key=lambda t: t[axis])


def step_beyond(end: float, neighbour: float) -> float:
    """The next value after ``end`` going away from ``neighbour``: at their ratio when they have one sign, by
    their difference otherwise; 6 significant digits, an int when both were ints and it is whole."""
    value = end * (end / neighbour) if end * neighbour > 0 else end + (end - neighbour)
    value = float(f"{value:.6g}")
    if isinstance(end, int) and isinstance(neighbour, int) and value.is_integer():
        return int(value)
    return value


def setting_beyond(end: dict[str, Any], neighbour: dict[str, Any], axis: str) -> dict[str, Any] | None:
    """``end`` with the axis' key(s) moved one step away from ``neighbour``; None when nothing can move."""
    keys = list(end) if axis == "*" else [axis]
    new = dict(end)
    for key in keys:
        a, b = end.get(key), neighbour.get(key)
        if is_number(a) and is_number(b) and a != b:
            new[key] = step_beyond(a, b)
    return None if new == end else new


def edges(entry: Any, grid: list[dict[str, Any]], extensions: list[Extension],
          selected: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(axis, end, the setting beyond it) for every axis on which the selected setting is an end of its line."""
    out = []
    for axis in grid_axes(entry):
        line = axis_line(axis, grid, extensions, selected)
        if len(line) < 2:
            continue
        if line[0] == selected:
            out.append((axis, "low", setting_beyond(line[0], line[1], axis)))
        elif line[-1] == selected:
            out.append((axis, "high", setting_beyond(line[-1], line[-2], axis)))
    return out


def extension_settings(entry: Any, grid: list[dict[str, Any]], extensions: list[Extension],
                       selected: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The new trials of one extension round: one beyond each end the pick sits at (none already tried)."""
    tried = [*grid, *(e.setting for e in extensions)]
    out: list[tuple[str, str, dict[str, Any]]] = []
    for axis, end, new in edges(entry, grid, extensions, selected):
        if new is not None and new not in tried and new not in [s for _, _, s in out]:
            out.append((axis, end, new))
    return out


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


def select(cells: list[Cell], settings: list[dict[str, Any]]) -> Selection | None:
    """The selection rule (module docstring) over one method's trial cells (``settings[i]``: trial i's); None
    until all have finished (or diverged), or when every trial diverged."""
    if not all(c.finished() or diverged(c) for c in cells):
        return None
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
    extensions: dict[str, list[Extension]] = field(default_factory=dict)
    open_edges: dict[str, list[str]] = field(default_factory=dict)  # axes where the pick is still at an end

    def report_cells(self) -> list[Cell]:
        return [c for cells in self.report.values() for c in cells]


def tune_methods(protocol: Protocol, labels: Sequence[str], runs_dir: Path, jobs: int = 1,
                 extra: Sequence[str] = (), train: bool = True,
                 log: Callable[[str], None] = print) -> TunedRun:
    """The tuning phase: the grid's trials, then up to ``tune.extend`` extension rounds (module docstring)."""
    assert protocol.tune is not None
    entries, grids = protocol.tune.grid, check_tune(protocol)
    trials = tuning_cells(protocol, labels, runs_dir)
    extensions: dict[str, list[Extension]] = {label: [] for label in labels}
    outcomes: list[tuple[Cell, int, str]] = []
    for rnd in range(protocol.tune.extend + 1):
        if train:
            todo = [c for c in round_robin(trials) if not diverged(c)]
            log(f"tuning{f' (extension round {rnd})' if rnd else ''}: {len(todo)} trial runs on seed "
                f"{protocol.tune.seed}")
            outcomes += run_grid(todo, jobs, extra, log)
        grown = False
        for label in labels if rnd < protocol.tune.extend else ():
            settings = [*grids[label], *(e.setting for e in extensions[label])]
            sel = select(trials[label], settings)
            if sel is None:
                continue
            for axis, end, setting in extension_settings(entries[label], grids[label], extensions[label],
                                                         sel.setting):
                index = len(trials[label])
                extensions[label].append(Extension(index, setting, axis, end, rnd + 1))
                trials[label].append(trial_cell(protocol, label, trials[label][0].config, index, setting, runs_dir))
                check_cells(trials[label][-1:])
                log(f"{label}: the pick ({setting_text(sel.setting)}) is the {end} end of "
                    f"{'its ladder' if axis == '*' else axis.removeprefix('method.')}: adding trial {index} "
                    f"({setting_text(setting)})")
                grown = True
        if not grown:
            break
    selections, open_edges = {}, {}
    for label in labels:
        settings = [*grids[label], *(e.setting for e in extensions[label])]
        selections[label] = sel = select(trials[label], settings)
        if sel is not None:
            open_edges[label] = [axis for axis, _, _ in edges(entries[label], grids[label], extensions[label],
                                                              sel.setting)]
    return TunedRun(trials, selections, {}, outcomes, extensions, open_edges)


def run(protocol: Protocol, labels: Sequence[str], seeds: int, runs_dir: Path, jobs: int = 1,
        extra: Sequence[str] = (), train: bool = True, log: Callable[[str], None] = print) -> TunedRun:
    """Both phases (module docstring); ``train`` False: only what has finished (``--report``)."""
    report_at = report_seeds(protocol, seeds)
    tuned = tune_methods(protocol, labels, runs_dir, jobs, extra, train, log)
    for label, sel in tuned.selections.items():
        cells = tuned.trials[label]
        if sel is None:
            every = all(diverged(c) for c in cells)
            log(f"{label}: {'every trial diverged' if every else 'not every trial has finished'}; no report runs")
            continue
        metric = next(k for k in sel.trials[0] if k.startswith("val_"))
        vals = ", ".join("diverged" if t[metric] is None else f"{t[metric]:.2f}" for t in sel.trials)
        spent = sum(json.loads(c.summary_path.read_text())["train_seconds"] for c in cells)
        edge = tuned.open_edges.get(label)
        log(f"{label}: selected trial {sel.trial} ({setting_text(sel.setting)}), {metric} {sel.val:.2f} "
            f"(trials: {vals}); {len(cells)} trials ({len(tuned.extensions[label])} extensions), {spent:.0f} s"
            f"{f'; still at an end of {edge} (the bound reached)' if edge else ''}")
        tuned.report[label] = report_cells(cells, sel, report_at, runs_dir)
    if train:
        log(f"report: the selected settings on seeds {', '.join(map(str, report_at))}")
        tuned.outcomes += run_grid(tuned.report_cells(), jobs, extra, log)
    return tuned


def cost(tuned: TunedRun) -> dict[str, Any]:
    """Runs done (finished or diverged) and the sum of their train_seconds (one thread each: about CPU-core
    seconds), per phase; per method the tuning runs and seconds; and what the teacher cache saved: the tuning
    seconds without it estimated as every trial that read the cache costing its method's trials that did not
    (an estimate: the same model pair, step for step, at other loss weights)."""
    def seconds(cells: list[Cell]) -> tuple[int, float]:
        done = [c for c in cells if c.finished() or diverged(c)]
        return len(done), sum(json.loads(c.summary_path.read_text())["train_seconds"] for c in done)

    trial_cells = [c for cells in tuned.trials.values() for c in cells]
    trial_dirs = {c.out for c in trial_cells}
    n_t, s_t = seconds(trial_cells)
    n_r, s_r = seconds([c for c in tuned.report_cells() if c.out not in trial_dirs])  # a reused seed: once
    per_method = {}
    uncached_total = 0.0
    for label, cells in tuned.trials.items():
        done = [json.loads(c.summary_path.read_text()) for c in cells if c.finished() or diverged(c)]
        read = [s for s in done if (s.get("teacher_cache") or {}).get("read_steps")]
        plain = [s["train_seconds"] for s in done if s not in read]
        spent = sum(s["train_seconds"] for s in done)
        uncached = spent + sum(max(0.0, sum(plain) / len(plain) - s["train_seconds"]) for s in read) if plain \
            else spent
        uncached_total += uncached
        per_method[label] = {"tuning_runs": len(done), "extensions": len(tuned.extensions.get(label, [])),
                             "tuning_seconds": spent, "cache_reads": len(read),
                             "tuning_seconds_without_cache_estimate": uncached}
    return {"tuning_cells": n_t, "report_cells": n_r, "cells": n_t + n_r, "tuning_cell_seconds": s_t,
            "report_cell_seconds": s_r, "cell_seconds": s_t + s_r,
            "tuning_cell_seconds_without_cache_estimate": uncached_total, "per_method": per_method}


def summarise(protocol: Protocol, tuned: TunedRun) -> list[dict[str, Any]]:
    """:func:`featkd.bench.stats.summarise` over the report runs, each row with its trials, selection, final
    grid (its extensions, the bound) and whether the pick is still at an open edge."""
    rows = stats.summarise(protocol, tuned.report_cells())
    for row in rows:
        label = row["method"]
        sel = tuned.selections[label]
        assert sel is not None and protocol.tune is not None
        row.update(trials=sel.trials, selected_trial=sel.trial, selected_setting=sel.setting,
                   selection_val=sel.val, tuning_seed=protocol.tune.seed,
                   final_grid=[t["setting"] for t in sel.trials], extension_bound=protocol.tune.extend,
                   extensions=[dataclasses.asdict(e) for e in tuned.extensions.get(label, [])],
                   open_edge=tuned.open_edges.get(label, []))
    return rows


def setting_text(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('method.')}={v}" for k, v in setting.items()) or "config as is"


def markdown(protocol: Protocol, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The tuned table: selection, val and test per method, unpaired and paired deltas; then every trial."""
    metric = rows[0]["metric"] if rows else "acc"
    paired = paired_columns(protocol, rows)
    head = ["method", "trials", "selected", "pick in the grid", f"val {metric} at selection", "seeds",
            f"val {metric} (mean ± s.e.)",
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
        cells = [r["method"], str(len(r["trials"])), setting_text(r["selected_setting"]), pick_text(r),
                 f"{r['selection_val']:.2f}",
                 str(r["seeds"]), format_mean_se(r.get(f"val_{metric}_mean"), r.get(f"val_{metric}_se")),
                 format_mean_se(r[f"{metric}_mean"], r[f"{metric}_se"]),
                 format_mean_se(r["delta_vs_ce"], r["delta_se"], sign=True),
                 *(format_paired(r["paired"].get(b)) for b in paired),
                 f"{r['train_s']:.0f} s", "" if ratio is None else f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    width = max((len(r["trials"]) for r in rows), default=0)
    bound = rows[0].get("extension_bound", 0) if rows else 0
    lines += ["", f"Trials: final-epoch val {metric} on the tuning seed {meta['tuning_seed']} (selected in bold; "
              f"+: added beyond an end of the grid, at most {bound} round(s) per method).", "",
              "| method | " + " | ".join(f"trial {i}" for i in range(width)) + " |", "|" + "---|" * (width + 1)]
    for r in rows:
        texts = []
        for t in r["trials"]:
            val = t[f"val_{metric}"]
            text = f"{setting_text(t['setting'])}: {'diverged' if val is None else f'{val:.2f}'}"
            text = f"+{text}" if t["trial"] in {e["trial"] for e in r.get("extensions", [])} else text
            texts.append(f"**{text}**" if t["trial"] == r["selected_trial"] else text)
        lines.append("| " + " | ".join([r["method"], *texts, *[""] * (width - len(texts))]) + " |")
    lines += ["", f"Cost: {c['cells']} runs ({c['tuning_cells']} tuning, {c['report_cells']} report), sum of their "
              f"train times {c['cell_seconds']:.0f} s ({c['cell_seconds'] / 3600:.2f} h, one thread per run); wall "
              f"{meta['wall_seconds']:.0f} s for this invocation"
              + (f"; tuning {c['tuning_cell_seconds']:.0f} s with the teacher cache, about "
                 f"{c['tuning_cell_seconds_without_cache_estimate']:.0f} s without it (estimated: every trial that "
                 "read the cache at its method's writing trial's time)."
                 if "tuning_cell_seconds_without_cache_estimate" in c else "."),
              f"Command: `{meta['command']}`; {meta['environment']['torch_threads']} thread(s), "
              f"{meta['environment']['cpu_count']} CPU(s), {meta['environment']['date']}."]
    return "\n".join(lines) + "\n"


def pick_text(row: dict[str, Any]) -> str:
    """Where the selected setting sits: inside its grid, or at an end the extension bound left open."""
    edge = row.get("open_edge")
    if edge is None:
        return ""
    if not edge:
        return "inside" if row.get("extensions") or len(row["trials"]) > 1 else "no knobs"
    axes = ", ".join("ladder" if a == "*" else a.removeprefix("method.") for a in edge)
    return f"at an end ({axes}; bound {row.get('extension_bound', 0)} reached)"


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
