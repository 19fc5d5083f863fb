"""``featkd bench PROTOCOL [--tune] [--methods ...] [--seeds N] [--jobs J]``: run a benchmark protocol's grid.

Finished cells are kept (the grid resumes where it stopped); results go to
``benchmarks/results/<protocol>.json`` and ``.md`` (+ plots). A protocol with a ``tune:`` section runs with
``--tune`` (:mod:`featkd.bench.tune`: trials selected on the validation split, then N report seeds).
``--estimate RESULTS_JSON`` trains nothing and prints the grid's expected cost. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = "run a benchmark protocol (method configs x seeds), resumably, and write its results table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("protocol", help="data-limited, pretrained, full, or a protocol YAML path")
    p.add_argument("--methods", nargs="+", help="only these rows of the protocol")
    p.add_argument("--seeds", type=int, help="seeds per method (default: the protocol's)")
    p.add_argument("--jobs", type=int, default=1, help="training processes at a time (default 1)")
    p.add_argument("--runs-dir", help="where the cells' run folders go (default runs/bench/<protocol>)")
    p.add_argument("--results-dir", default="benchmarks/results", help="where the tables go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every cell (changes the runs: use a fresh --runs-dir)")
    p.add_argument("--no-timing", action="store_true", help="skip the step-time ratio measurement")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write the tables from the cells that have finished so far")
    p.add_argument("--tune", action="store_true",
                   help="a tuned protocol (one with a tune: section): every method's trials on the tuning seed, "
                        "the best final-epoch validation value selected, then run on --seeds report seeds")
    p.add_argument("--estimate", metavar="RESULTS_JSON", nargs="?", const="",
                   help="train nothing: print the expected cost of the grid, from the per-run train_s of the rows "
                        "of RESULTS_JSON (e.g. benchmarks/results/data-limited.json), or without it from the "
                        "models' FLOPs and the protocol's train_images (the paper-* protocols: GPU hours)")
    p.add_argument("--gpu-tflops", type=float,
                   help="with --estimate and no RESULTS_JSON: effective TFLOP/s of one GPU (default: a gpu_check "
                        "measurement in --results-dir, else 100, ~10 %% of an H100's bf16 peak)")
    p.add_argument("--smoke", action="store_true",
                   help="every row for 2 training steps and 1 evaluation on --data-dir, random weights, CPU: checks "
                        "the protocol runs before any GPU hour is spent")
    p.add_argument("--data-dir", help="with --smoke: the data (the real set or a small copy in its layout)")


def run(args: argparse.Namespace) -> int:
    import shlex
    import time

    from featkd.bench import report, runner, stats
    from featkd.bench.protocol import load_protocol, tuned_protocols
    from featkd.bench.timing import environment
    from featkd.errors import FeatkdError

    protocol = load_protocol(args.protocol)
    seeds = args.seeds or protocol.seeds
    if seeds < 1 or args.jobs < 1:
        raise FeatkdError("--seeds and --jobs must be at least 1")
    if args.tune and protocol.tune is None:
        raise FeatkdError(f"protocol {protocol.name} has no tune: section to run with --tune (tuned protocols: "
                          f"{', '.join(tuned_protocols()) or 'none'})")
    if protocol.tune is not None and not args.tune:
        raise FeatkdError(f"protocol {protocol.name} is a tuned protocol (it has a tune: section): run it with --tune")
    runs_dir = Path(args.runs_dir or f"runs/bench/{protocol.name}")
    extra = [x for item in args.overrides for x in ("--set", item)]
    if args.smoke:
        from featkd.bench import paper

        if not args.data_dir:
            raise FeatkdError("--smoke needs --data-dir DIR (the protocol's data set, or a few files in its layout)")
        rows = paper.smoke(protocol, runner.select_labels(protocol, args.methods), args.data_dir, args.overrides)
        print(f"smoke: {len(rows)} rows of {protocol.name} trained 2 steps and evaluated in "
              f"{sum(r['seconds'] for r in rows):.0f}s")
        return 0
    if args.estimate == "":
        from featkd.bench import paper

        labels = runner.select_labels(protocol, args.methods)
        print(paper.estimate_text(paper.estimate(protocol, labels, seeds, args.gpu_tflops,
                                                 results_dir=Path(args.results_dir))))
        return 0
    if args.estimate:
        from featkd.bench import tune as bench_tune

        labels = runner.select_labels(protocol, args.methods)
        estimate = bench_tune.estimate(protocol, labels, seeds, args.estimate, args.overrides)
        print(bench_tune.estimate_text(estimate, args.jobs))
        return 0
    if args.tune:
        return run_tuned(args, protocol, seeds, runs_dir, extra)
    cells = runner.grid(protocol, args.methods, seeds, runs_dir)
    t0 = time.perf_counter()
    outcomes = [] if args.report else runner.run_grid(cells, args.jobs, extra)
    failed = [(c, msg) for c, code, msg in outcomes if code != 0]
    rows = stats.summarise(protocol, cells)
    if not rows:
        raise FeatkdError(f"no finished runs in {runs_dir}")
    timing_failed = [] if args.no_timing else add_step_ratios(protocol, rows, runs_dir)
    meta = {"protocol": protocol.name, "command": "featkd bench " + " ".join(map(shlex.quote, sys.argv[2:])),
            "runs_dir": str(runs_dir), "wall_seconds": time.perf_counter() - t0, "environment": environment()}
    out = Path(args.results_dir)
    table = report.markdown(protocol, rows, meta)
    written = write_results(out, protocol.name, {**meta, "rows": rows}, table)
    written += report.plot(protocol, rows, cells, out / protocol.name)
    print(table)
    return report_end(written, [(f"{cell.label} seed {cell.seed}", msg) for cell, msg in failed] + timing_failed)


def add_step_ratios(protocol, rows: list[dict[str, Any]], runs_dir: Path,
                    settings: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """Each row's ``step_time_ratio``, measured side by side; a method that cannot be timed leaves every ratio
    None and is reported (the results tables are still written: the runs are what they measure)."""
    from featkd.bench import runner
    from featkd.errors import FeatkdError

    print("measuring step times side by side" + (" (the selected settings)" if settings else "") + " ...")
    try:
        ratios = runner.step_time_ratios(protocol, [r["method"] for r in rows], runs_dir, settings=settings)
    except FeatkdError as exc:
        return [("step-time measurement", str(exc))]
    for r in rows:
        r["step_time_ratio"] = ratios.get(r["method"])
    return []


def write_results(out: Path, name: str, payload: dict[str, Any], table: str) -> list[Path]:
    """``<name>.json`` (the payload) and ``<name>.md`` (the table) in ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(payload, indent=2) + "\n")
    paths[1].write_text(table)
    return paths


def report_end(written: list[Path], failed: list[tuple[str, str]]) -> int:
    """Print what was written and every failed cell; the exit status (1 if a cell failed)."""
    print("wrote " + ", ".join(map(str, written)))
    for name, msg in failed:
        print(f"FAILED: {name}: {msg}", file=sys.stderr)
    return 1 if failed else 0


def run_tuned(args: argparse.Namespace, protocol, seeds: int, runs_dir, extra: list[str]) -> int:
    """``--tune``: both phases of :mod:`featkd.bench.tune`, then its table; the cost is printed and stored."""
    import shlex
    import time

    from featkd.bench import report, runner
    from featkd.bench import tune as bench_tune
    from featkd.bench.protocol import trial_overrides
    from featkd.bench.timing import environment
    from featkd.errors import FeatkdError

    t0 = time.perf_counter()
    labels = runner.select_labels(protocol, args.methods)
    tuned = bench_tune.run(protocol, labels, seeds, runs_dir, args.jobs, extra, train=not args.report)
    failed = [(c, msg) for c, code, msg in tuned.outcomes  # a diverged trial is its setting's outcome, recorded
              if code != 0 and not (c.trial is not None and bench_tune.diverged(c))]
    rows = bench_tune.summarise(protocol, tuned)
    if not rows:
        raise FeatkdError(f"no method of {protocol.name} has finished report runs in {runs_dir}")
    settings = {r["method"]: trial_overrides(r["selected_setting"]) for r in rows}
    timing_failed = [] if args.no_timing else add_step_ratios(protocol, rows, runs_dir, settings)
    cost = {**bench_tune.cost(tuned), "wall_seconds": time.perf_counter() - t0, "jobs": args.jobs}
    first = next(iter(tuned.trials.values()))[0]
    meta = {"protocol": protocol.name, "tuned": True,
            "command": "featkd bench " + " ".join(map(shlex.quote, sys.argv[2:])), "runs_dir": str(runs_dir),
            "selection_rule": bench_tune.selection_rule(protocol, rows[0]["metric"]),
            "tuning_seed": protocol.tune.seed, "reuse_seed": protocol.tune.reuse_seed,
            "report_seeds": bench_tune.report_seeds(protocol, seeds),
            "val_fraction": bench_tune.require_val(protocol, first), "paired_against": protocol.paired_baselines(),
            "wall_seconds": cost["wall_seconds"], "cost": cost, "environment": environment()}
    out = Path(args.results_dir)
    table = bench_tune.markdown(protocol, rows, meta)
    written = write_results(out, protocol.name, {**meta, "rows": rows}, table)
    written += report.plot(protocol, rows, tuned.report_cells(), out / protocol.name)
    print(table)
    print(f"tuned protocol cost: {cost['cells']} runs ({cost['tuning_cells']} tuning, {cost['report_cells']} "
          f"report), sum of run times {cost['cell_seconds']:.0f} s ({cost['cell_seconds'] / 3600:.2f} CPU-core h "
          f"at one thread per run), wall {cost['wall_seconds']:.0f} s with {args.jobs} job(s) for this invocation")
    return report_end(written, [(cell.name, msg) for cell, msg in failed] + timing_failed)
