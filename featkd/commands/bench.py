"""``featkd bench PROTOCOL [--methods ...] [--seeds N] [--jobs J]``: run a benchmark protocol's grid.

Finished cells are kept (the grid resumes where it stopped); results go to
``benchmarks/results/<protocol>.json`` and ``.md`` (+ plots). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse

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


def run(args: argparse.Namespace) -> int:
    import json
    import shlex
    import sys
    import time
    from pathlib import Path

    from featkd import bench
    from featkd.errors import FeatkdError
    from featkd.timing import environment

    protocol = bench.load_protocol(args.protocol)
    seeds = args.seeds or protocol.seeds
    if seeds < 1 or args.jobs < 1:
        raise FeatkdError("--seeds and --jobs must be at least 1")
    runs_dir = Path(args.runs_dir or f"runs/bench/{protocol.name}")
    cells = bench.grid(protocol, args.methods, seeds, runs_dir)
    extra = [x for item in args.overrides for x in ("--set", item)]
    t0 = time.perf_counter()
    outcomes = [] if args.report else bench.run_grid(cells, args.jobs, extra)
    failed = [(c, msg) for c, code, msg in outcomes if code != 0]
    rows = bench.summarise(protocol, cells)
    if not rows:
        raise FeatkdError(f"no finished runs in {runs_dir}")
    if not args.no_timing:
        print("measuring step times side by side ...")
        ratios = bench.step_time_ratios(protocol, [r["method"] for r in rows], runs_dir)
        for r in rows:
            r["step_time_ratio"] = ratios.get(r["method"])
    meta = {"protocol": protocol.name, "command": "featkd bench " + " ".join(map(shlex.quote, sys.argv[2:])),
            "runs_dir": str(runs_dir), "wall_seconds": time.perf_counter() - t0, "environment": environment()}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{protocol.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    table = bench.markdown(protocol, rows, meta)
    (out / f"{protocol.name}.md").write_text(table)
    plots = bench.plot(protocol, rows, cells, out / protocol.name)
    print(table)
    print(f"wrote {out / (protocol.name + '.json')}, {out / (protocol.name + '.md')}"
          + "".join(f", {p}" for p in plots))
    if failed:
        for cell, msg in failed:
            print(f"FAILED: {cell.label} seed {cell.seed}: {msg}", file=sys.stderr)
        return 1
    return 0
