"""``featkd demo [--json PATH]``: the main job on the embedded digits data, as a results table."""

from __future__ import annotations

import argparse

HELP = "train a teacher on digits, distil students with every method, print a table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="also write the table (and per-seed accuracies) to this JSON file")
    p.add_argument("--seeds", type=int, default=3, help="student seeds per method (default 3)")
    p.add_argument("--methods", nargs="+", help="subset of methods (default: every method with a demo recipe)")
    p.add_argument("--epochs", type=int, help="student epochs (default: the recipe's)")
    p.add_argument("--jobs", type=int, help="student runs at a time, one per core (default: 2 on 2+ cores)")
    p.add_argument("--work-dir", default="runs/demo", help="where a teacher trained on the spot is kept")


def run(args: argparse.Namespace) -> int:
    import os
    import time

    from featkd.apps import demo
    from featkd.errors import FeatkdError

    if args.seeds < 1:
        raise FeatkdError("--seeds: must be at least 1")
    if args.jobs is not None and args.jobs < 1:
        raise FeatkdError("--jobs: must be at least 1")
    jobs = args.jobs or demo.default_jobs()
    t0 = time.perf_counter()
    print(f"featkd demo: digits (scikit-learn), ResNet-20 teacher -> ResNet-8 students on 300 training "
          f"images, {args.seeds} seed(s), {jobs} run(s) at a time on {os.cpu_count()} CPU core(s)")
    rows = demo.run_demo(args.methods, args.seeds, args.epochs, args.work_dir, jobs=jobs)
    total = time.perf_counter() - t0
    print()
    teacher_acc = next((r["teacher_test_acc"] for r in rows if r["teacher_test_acc"] is not None), None)
    if teacher_acc is not None:
        print(f"teacher test accuracy: {teacher_acc:.2f}")
    print(demo.format_table(rows))
    print(f"\ntotal time {total:.0f}s")
    if args.json:
        demo.write_json(rows, args.json, {"dataset": "digits", "total_seconds": total})
        print(f"wrote {args.json}")
    return 0
