"""The benchmark runner behind ``featkd bench PROTOCOL``: a resumable grid of (method config x seed) runs.

A protocol is a YAML file in ``benchmarks/protocols/`` (shipped in the wheel: :mod:`featkd.resources`; see
``benchmarks/README.md``)::

    name: data-limited
    description: ...
    seeds: 3
    reference: none            # the row every delta is measured against (no distillation)
    timing_reference: kd       # step-time ratios are taken against this row (Hinton KD)
    methods:                   # row label -> experiment config (configs/...: the shipped example configs)
      none: configs/fashion-mnist-none-resnet8.yaml
      kd: configs/fashion-mnist-kd-resnet20-resnet8.yaml

Every cell is an ordinary ``featkd train CONFIG --seed S --out RUNS/<label>/seed<S>`` process. A cell whose
``summary.json`` says ``finished`` is not run again; a cell with a ``last.pt`` is resumed. Results:
``benchmarks/results/<protocol>.json`` (one row per method: ``method``, ``seeds``, ``metric`` (the task's:
``acc``, ``miou``), ``<metric>_mean``, ``<metric>_se``,
``delta_vs_ce``, ``delta_se``, ``train_s``, ``seed_ids``, ``paired``, ...), a Markdown table next to it, and plots
when matplotlib is installed. Accuracy is each run's final-epoch test accuracy (never the best epoch: that would
select on the test set); s.e. = sample standard deviation / sqrt(seeds).

Paired columns: every method runs the same seeds, and one seed is one training subset (``data.subset_seed`` is
the config's, not the seed), one validation split, one student init and one data order for every method, so
``paired[b]`` is the mean +- s.e. of the per-seed differences to row ``b`` (the reference and ``kd`` unless the
protocol's ``paired:`` says otherwise), with the wins / losses over those seeds.

``val_fraction: F`` in a protocol sets ``data.val_fraction`` in every cell (a seeded, class-stratified hold-out
of the training split, the same for every method and seed: :mod:`featkd.data.splits`). A ``tune:`` section
makes the protocol a tuned one, run with ``featkd bench PROTOCOL --tune`` (:mod:`featkd.bench.tune`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featkd import resources
from featkd.errors import FeatkdError, did_you_mean


@dataclass
class Protocol:
    name: str
    methods: dict[str, str]
    seeds: int = 3
    reference: str = "none"
    timing_reference: str = "kd"
    description: str = ""
    epoch_marks: list[int] = field(default_factory=list)  # also report test accuracy after these epochs
    # If set, every row keeps only the `method` section of its config and takes everything else (data,
    # teacher, student, optim, train) from this file: one set of method configs serves every protocol.
    base: str | None = None
    val_fraction: float | None = None  # data.val_fraction of every cell (a validation split: the same for all)
    paired: list[str] | None = None  # rows the paired per-seed differences are taken against (default below)
    tune: TuneSpec | None = None  # a tuned protocol (featkd bench --tune; featkd.bench.tune)

    def paired_baselines(self) -> list[str]:
        """The rows of the paired columns: ``paired:``, else the reference and ``kd`` (when it is a row)."""
        if self.paired is not None:
            return list(self.paired)
        return list(dict.fromkeys([self.reference, *(["kd"] if "kd" in self.methods else [])]))

    def overrides(self) -> list[str]:
        """``--set`` items every cell of the protocol gets (after the user's own ``--set``, so they win)."""
        return [] if self.val_fraction is None else [f"data.val_fraction={self.val_fraction!r}"]


def fixed_by_protocol(key: str) -> bool:
    """Config keys a trial may not set: the data (subset, validation split) and the seed are the protocol's,
    the same for every method."""
    return key.startswith("data.") or key == "train.seed"


@dataclass
class TuneSpec:
    """A protocol's ``tune:`` section (see :mod:`featkd.bench.tune` and benchmarks/README.md).

    ``grid``: method label -> its trials, either ``{key: [values, ...], ...}`` (every combination, the last
    key varying fastest) or a list of ``{key: value, ...}`` (one trial each); keys are config paths
    (``method.kd_weight``). ``{}`` (or no knobs at all): one trial, the config as it is. Every method with knobs
    must have the same number of trials.
    """

    grid: dict[str, Any]
    seed: int = 100  # the tuning seed: every trial trains with it
    # False: report seeds are 0..N-1 and must not include the tuning seed (selection and report use different
    # inits and data orders). True: the tuning seed must be one of 0..N-1, and the selected trial's run is that
    # seed's report run (one run fewer per method, but one reported seed is the one the setting was picked on).
    reuse_seed: bool = False

    def validate(self, path: str) -> None:
        if self.seed < 0:
            raise FeatkdError(f"{path}.seed: expected a seed >= 0, got {self.seed}")


def trial_settings(entry: Any, where: str) -> list[dict[str, Any]]:
    """The trials of one ``tune.grid`` entry (see :class:`TuneSpec`): a list of {config key: value}."""
    if entry is None or entry == {} or entry == []:
        return [{}]
    if isinstance(entry, dict):
        for key, values in entry.items():
            if not isinstance(values, list) or not values:
                raise FeatkdError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
        keys = list(entry)
        trials = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*entry.values())]
    elif isinstance(entry, list) and all(isinstance(t, dict) for t in entry):
        trials = [dict(t) for t in entry]
    else:
        raise FeatkdError(f"{where}: expected {{key: [values]}} or a list of {{key: value}}, got {entry!r}")
    for i, trial in enumerate(trials):
        for key in trial:
            if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
                raise FeatkdError(f"{where}: {key!r} is not a config key (e.g. method.kd_weight)")
            if fixed_by_protocol(key):
                raise FeatkdError(f"{where}: {key} cannot be tuned (the data and the seed are the protocol's, "
                                  "the same for every method)")
        if trial in trials[:i]:
            raise FeatkdError(f"{where}: trial {i} repeats trial {trials.index(trial)} ({trial})")
    return trials


def trial_overrides(setting: dict[str, Any]) -> list[str]:
    """A trial's setting as ``--set`` items (values as JSON, which ``--set`` reads back as YAML: "1e4" stays a
    string, 1e4 a number)."""
    return [f"{key}={json.dumps(value)}" for key, value in setting.items()]


def check_tune(protocol: Protocol) -> dict[str, list[dict[str, Any]]]:
    """Every method's trials, after checking the ``tune:`` section against the methods (one-line errors)."""
    assert protocol.tune is not None
    where = f"protocol {protocol.name}: tune.grid"
    grid = protocol.tune.grid
    for label in protocol.methods:
        if label not in grid:
            raise FeatkdError(f"{where}: no entry for method {label!r} (give `{label}: {{}}` if it has no knobs)")
    for label in grid:
        if label not in protocol.methods:
            raise FeatkdError(f"{where}.{label}: not one of the protocol's methods"
                              f"{did_you_mean(label, protocol.methods)}")
    trials = {label: trial_settings(grid[label], f"{where}.{label}") for label in protocol.methods}
    sized = {label: len(t) for label, t in trials.items() if t != [{}]}
    if len(set(sized.values())) > 1:
        first = next(iter(sized))
        other = next(label for label, n in sized.items() if n != sized[first])
        raise FeatkdError(f"{where}: {other} has {sized[other]} trials, {first} has {sized[first]}: every method "
                          "with knobs needs the same number (one without knobs has 1)")
    return trials


def protocols_dir() -> Path:
    """$FEATKD_PROTOCOLS, else the shipped protocols (the repository's benchmarks/protocols/ in a clone)."""
    return resources.protocols_dir()


def tuned_protocols() -> list[str]:
    """The shipped protocols that have a ``tune:`` section."""
    from featkd.config import read_yaml

    return sorted(p.stem for p in protocols_dir().glob("*.yaml") if "tune" in read_yaml(p))


def protocol_file(ref: str, shipped: bool) -> Path | None:
    """The resolved config file a protocol names, or None if there is none.

    Paths are relative to featkd's shipped data (``configs/NAME.yaml``: the example configs, from a clone or
    an installed wheel alike); a protocol given as a file (``shipped`` False) may also name files relative to
    the current folder, which are looked for first.
    """
    path = Path(ref).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = ([] if shipped else [Path.cwd() / path]) + [resources.data_root() / path]
    return next((c.resolve() for c in candidates if c.is_file()), None)


def load_protocol(name_or_path: str) -> Protocol:
    """A protocol by name (``benchmarks/protocols/<name>.yaml``) or path, with its config files resolved."""
    from featkd.config import from_dict, read_yaml

    path = Path(name_or_path)
    shipped = not path.suffix
    if shipped:
        folder = protocols_dir()
        path = folder / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in folder.glob("*.yaml"))
            raise FeatkdError(f"unknown protocol {name_or_path!r}{did_you_mean(name_or_path, known)}; "
                              f"available: {', '.join(known) or 'none'} (in {folder})")
    protocol = from_dict(Protocol, read_yaml(path), "protocol")
    if protocol.tune is not None:
        check_tune(protocol)  # the grid first: a wrong trial count is an error even before the configs exist
    if protocol.val_fraction is not None and not 0.0 < protocol.val_fraction < 1.0:
        raise FeatkdError(f"protocol {protocol.name}: val_fraction: expected a number in (0, 1), "
                          f"got {protocol.val_fraction}")
    for label in protocol.paired or []:
        if label not in protocol.methods:
            raise FeatkdError(f"protocol {protocol.name}: paired: {label!r} is not one of its methods"
                              f"{did_you_mean(label, protocol.methods)}")
    where = "in featkd's shipped data" if shipped else "in the current folder or featkd's shipped data"
    if protocol.base:
        base = protocol_file(protocol.base, shipped)
        if base is None:
            raise FeatkdError(f"protocol {protocol.name}: base {protocol.base} not found ({where})")
        protocol.base = str(base)
    for label, cfg in protocol.methods.items():
        found = protocol_file(cfg, shipped)
        if found is None:
            raise FeatkdError(f"protocol {protocol.name}: methods.{label}: config {cfg} not found ({where})")
        protocol.methods[label] = str(found)
    if protocol.reference not in protocol.methods:
        raise FeatkdError(f"protocol {protocol.name}: reference {protocol.reference!r} is not one of its methods")
    return protocol


@dataclass
class Cell:
    label: str
    config: str
    seed: int
    out: Path
    overrides: tuple[str, ...] = ()  # the protocol's and the trial's --set items (val_fraction, knobs)
    trial: int | None = None  # a tuning trial (featkd bench --tune), else a seed's run

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"

    @property
    def name(self) -> str:
        return f"{self.label} seed {self.seed}" if self.trial is None else f"{self.label} trial {self.trial}"

    def status(self) -> str | None:
        """The run's summary status (finished, diverged, stopped, preempted), None before it has one."""
        if not self.summary_path.is_file():
            return None
        return json.loads(self.summary_path.read_text()).get("status")

    def finished(self) -> bool:
        """Whether the run finished; a finished run trained with other values of the cell's overrides (the
        protocol's grid or val_fraction changed since) is an error: its numbers would be reported as these."""
        if self.status() != "finished":
            return False
        self.check_setting()
        return True

    def check_setting(self) -> None:
        from featkd.config import parse_override, read_yaml

        if not self.overrides or not (self.out / "config.yaml").is_file():
            return
        ran = read_yaml(self.out / "config.yaml")
        for item in self.overrides:
            keys, wanted = parse_override(item)
            node: Any = ran
            for k in keys:
                node = node.get(k) if isinstance(node, dict) else None
            if node != wanted:
                raise FeatkdError(f"{self.out} was trained with {'.'.join(keys)}={node!r}, not {wanted!r} as the "
                                  "protocol now says: use a fresh --runs-dir (or remove that run folder)")


def cell_config(protocol: Protocol, label: str, runs_dir: Path) -> str:
    """The config a row trains with: its own file, or (with ``protocol.base``) its method over the base."""
    if not protocol.base:
        return protocol.methods[label]
    from featkd.config import build_config, dump_yaml, load_raw, merge

    own = load_raw(protocol.methods[label])
    raw = merge(load_raw(protocol.base), {"name": f"{protocol.name}-{label}", "method": own["method"]})
    path = runs_dir / label / "input.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(build_config(raw)))  # validated now, so a bad row fails before any training
    return str(path)


def select_labels(protocol: Protocol, methods: Sequence[str] | None) -> list[str]:
    """``--methods`` (checked against the protocol's rows), else all of them."""
    labels = list(methods or protocol.methods)
    for label in labels:
        if label not in protocol.methods:
            raise FeatkdError(f"--methods: {label!r} is not in protocol {protocol.name}"
                              f"{did_you_mean(label, protocol.methods)} (rows: {', '.join(protocol.methods)})")
    return labels


def grid(protocol: Protocol, methods: Sequence[str] | None, seeds: int, runs_dir: Path) -> list[Cell]:
    labels = select_labels(protocol, methods)
    configs = {label: cell_config(protocol, label, runs_dir) for label in labels}
    overrides = tuple(protocol.overrides())
    cells = [Cell(label, configs[label], seed, runs_dir / label / f"seed{seed}", overrides)
             for label in labels for seed in range(seeds)]
    check_cells(cells)
    return cells


def check_cells(cells: Sequence[Cell]) -> None:
    """Build (validate) the config of every cell with overrides, so that a bad knob fails before any training."""
    from featkd.config import apply_overrides, build_config, load_raw

    for cell in cells:
        if cell.overrides:
            try:
                build_config(apply_overrides(load_raw(cell.config), cell.overrides))
            except FeatkdError as exc:
                raise FeatkdError(f"{cell.name} ({' '.join(cell.overrides)}): {exc}") from None


def run_cell(cell: Cell, extra: Sequence[str] = ()) -> tuple[Cell, int, str]:
    """Train one cell in its own process (resuming it if it was interrupted)."""
    cmd = [sys.executable, "-m", "featkd", "train", cell.config, "--seed", str(cell.seed),
           "--out", str(cell.out), "--set", "train.progress=off", *extra,
           *(x for item in cell.overrides for x in ("--set", item))]
    if (cell.out / "last.pt").is_file():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)  # in this folder, as cell.out is
    message = (proc.stderr.strip().splitlines() or [""])[-1]
    return cell, proc.returncode, message


def run_grid(cells: list[Cell], jobs: int = 1, extra: Sequence[str] = (),
             log: Callable[[str], None] = print) -> list[tuple[Cell, int, str]]:
    """Run the unfinished cells, ``jobs`` at a time; returns (cell, exit code, last stderr line) per run."""
    todo = [c for c in cells if not c.finished()]
    log(f"{len(cells) - len(todo)} of {len(cells)} cells already finished; running {len(todo)} "
        f"with {jobs} job(s)")
    done: list[tuple[Cell, int, str]] = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for i, (cell, code, msg) in enumerate(pool.map(lambda c: run_cell(c, extra), todo), 1):
            done.append((cell, code, msg))
            status = "ok" if code == 0 else f"FAILED ({msg})"
            elapsed = time.perf_counter() - t0
            eta = elapsed / i * (len(todo) - i)
            log(f"[{i}/{len(todo)}] {cell.name}: {status}  "
                f"({elapsed:.0f}s elapsed, ~{eta:.0f}s left)")
    return done


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


METRIC_LABELS = {"acc": "test acc", "miou": "test mIoU", "ap": "test box AP"}


def _epoch_metric(out: Path, epoch: int, metric: str, split: str = "test") -> float | None:
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
    metric = _summary_metric(summary)[0]
    return _epoch_metric(cell.out, summary["epochs"], metric, "val")


def paired_delta(values: dict[int, float], base: dict[int, float]) -> dict[str, Any] | None:
    """Per-seed differences ``values[s] - base[s]`` over the seeds both have: n, mean, s.e., wins, losses."""
    seeds = sorted(set(values) & set(base))
    if not seeds:
        return None
    diffs = [values[s] - base[s] for s in seeds]
    mean, se = _mean_se(diffs)
    return {"n": len(seeds), "mean": mean, "se": se, "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs), "seeds": seeds}


def _summary_metric(summary: dict[str, Any]) -> tuple[str, float]:
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
        metric = _summary_metric(summaries[0])[0]
        accs = [_summary_metric(s)[1] for s in summaries]
        mean, se = _mean_se(accs)
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
            row[f"val_{metric}_mean"], row[f"val_{metric}_se"] = _mean_se(vals)
        for mark in protocol.epoch_marks:
            marks = [a for c in group if (a := _epoch_metric(c.out, mark, metric)) is not None]
            if marks:
                row[f"{metric}_epoch{mark}_mean"], row[f"{metric}_epoch{mark}_se"] = _mean_se(marks)
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


def step_time_ratios(protocol: Protocol, labels: Sequence[str], runs_dir: Path, rounds: int = 5,
                     calls: int = 5, settings: dict[str, Sequence[str]] | None = None) -> dict[str, float]:
    """Training-step time of each row's config / the timing reference's, measured side by side
    (``settings``: a row's --set items, e.g. its selected trial's)."""
    from featkd.bench.timing import ratios, time_interleaved, trainer_step
    from featkd.config import apply_overrides, build_config, load_raw
    from featkd.engine.trainer import Trainer

    wanted = list(dict.fromkeys([protocol.timing_reference, *labels]))
    steps = {}
    for label in wanted:
        own = [*protocol.overrides(), *(settings or {}).get(label, ())]
        raw = apply_overrides(load_raw(cell_config(protocol, label, runs_dir)),
                              ["train.progress=off", "train.tensorboard=false", *own])
        trainer = Trainer(build_config(raw), out_dir=None, log=lambda _m: None)
        step = trainer_step(trainer)
        try:
            step()
        except FeatkdError:  # the method needs its before-training setup first (MGD: the first matching)
            trainer.distiller.setup(trainer.context())
            step()
        steps[label] = step
    return ratios(time_interleaved(steps, rounds=rounds, calls=calls), protocol.timing_reference)


def format_mean_se(mean: float | None, se: float | None, sign: bool = False) -> str:
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
    """Accuracy per method with error bars, and test-accuracy-vs-epoch curves (matplotlib optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
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
