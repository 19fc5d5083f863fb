"""The runs behind ``featkd bench PROTOCOL``: a resumable grid of (method config x seed) cells, and step timing.

Every cell is an ordinary ``featkd train CONFIG --seed S --out RUNS/<label>/seed<S>`` process. A cell whose
``summary.json`` says ``finished`` is not run again; a cell with a ``last.pt`` is resumed. The protocol format
is :mod:`featkd.bench.protocol`; the statistics over the finished cells :mod:`featkd.bench.stats`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featkd.bench.protocol import Protocol
from featkd.errors import FeatkdError, did_you_mean


@dataclass
class Cell:
    label: str
    config: str
    seed: int
    out: Path
    overrides: tuple[str, ...] = ()  # the protocol's and the trial's --set items (val_fraction, knobs)
    trial: int | None = None  # a tuning trial (featkd bench --tune), else a seed's run
    # train.teacher_cache of the run: changes no number (the cached outputs are the teacher's own), so it is
    # not one of the overrides a finished run is checked against
    teacher_cache: Path | None = None

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
    """The config a row trains with: its own file; or (with ``protocol.base``) its method over the base, or its
    inline sections (a ``methods:`` entry that is a mapping) over the base."""
    if not protocol.base:
        return str(protocol.methods[label])
    from featkd.config import build_config, dump_yaml, load_raw, merge

    base = load_raw(protocol.base)
    entry = protocol.methods[label]
    if isinstance(entry, dict):  # inline: written for this protocol's base, so no schedule to scale
        raw = merge(base, {"name": f"{protocol.name}-{label}", **entry})
    else:
        own = load_raw(entry)
        method = {**own["method"], **{k: new for k, (_, new) in scaled_schedule(own, base).items()}}
        raw = merge(base, {"name": f"{protocol.name}-{label}", "method": method})
    path = runs_dir / label / "input.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(build_config(raw)))  # validated now, so a bad row fails before any training
    return str(path)


def scaled_schedule(own: dict[str, Any], base: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The method options counted in epochs (warm-ups, re-matching periods: ``EPOCH_COUNT`` fields) scaled by
    the base's ``train.epochs`` / the method config's own, when a protocol's base changes the run's length: a
    shortened protocol shortens every method's schedule by the same factor (rounded, an "on" count stays >= 1).
    Returns {option: (config value, scaled value)} for the options that change; {} at the same length."""
    from featkd.config import build_config
    from featkd.methods import METHODS
    from featkd.methods.base import epoch_count_options, scaled_epoch_count

    own_cfg = build_config(own)
    own_epochs, base_epochs = own_cfg.train.epochs, build_config({**base, "method": {"name": "none"}}).train.epochs
    if own_epochs == base_epochs:
        return {}
    typed = METHODS.get(own_cfg.method_name).Config(**own_cfg.method_options())
    factor = base_epochs / own_epochs
    scaled = {name: (getattr(typed, name), scaled_epoch_count(getattr(typed, name), factor))
              for name in epoch_count_options(typed)}
    return {name: pair for name, pair in scaled.items() if pair[0] != pair[1]}


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
    if cell.teacher_cache is not None:
        cmd += ["--set", f"train.teacher_cache={cell.teacher_cache}"]
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
