"""Does ``train.teacher_cache`` pay the teacher once per stream?  (issue 16, point 7)

A 4-run Hinton-KD sweep on one stream (same teacher, data and seed; ``method.kd_weight`` 0.25 / 0.5 / 1 / 2) is
run twice as ordinary ``featkd train`` processes: without the cache, and with a fresh cache folder (the first
run writes the teacher's per-step outputs, the other three read them). The two sweeps are interleaved run by
run (plain w, cached w, plain w', cached w', ...) so that the drift of a shared machine hits both alike. It
reports every run's wall time (process start to exit: imports, build, teacher evaluation, training, test
evaluation) and ``train_seconds`` (the training loop alone), the sweep totals and their ratios cached / plain,
and checks that every cached run ends with a student bit-identical to its plain twin's (deterministic mode).

    python benchmarks/teacher_cache.py [--config configs/digits-kd-resnet20-resnet8.yaml] [--epochs N]
        [--weights 0.25 0.5 1 2] [--work runs/teacher_cache] [--out benchmarks/results/teacher_cache.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from featkd.bench.timing import environment

ROOT = Path(__file__).resolve().parents[1]


def train(config: str, out: Path, weight: float, epochs: int | None, cache: Path | None) -> dict:
    """One ``featkd train`` process; its wall time, summary and what the cache did."""
    sets = [f"method.kd_weight={weight}", "train.seed=0", "train.deterministic=true", "train.num_threads=1",
            "train.progress=off", "train.tensorboard=false"]
    if epochs:
        sets.append(f"train.epochs={epochs}")
    if cache is not None:
        sets.append(f"train.teacher_cache={cache}")
    cmd = [sys.executable, "-m", "featkd", "train", config, "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"kd_weight": weight, "cached": cache is not None, "wall_s": round(wall, 2),
            "train_s": round(summary["train_seconds"], 2), "metric": summary["metric"],
            f"test_{summary['metric']}": summary["test_metric"],  # test_acc, test_miou, test_ap
            "teacher_cache": summary.get("teacher_cache")}


def same_student(a: Path, b: Path) -> bool:
    sa, sb = (torch.load(p / "student.pt", weights_only=True) for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits-kd-resnet20-resnet8.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: the config's)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "teacher_cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "teacher_cache.json")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)  # a fresh cache: the cached sweep's first run must write it
    cache = args.work / "cache"
    runs = []
    for i, w in enumerate(args.weights):
        for cached in (False, True):
            out = args.work / ("cached" if cached else "plain") / f"run{i}"
            row = train(args.config, out, w, args.epochs, cache if cached else None)
            runs.append(row)
            print(f"kd_weight {w:<5} {'cached' if cached else 'plain ':6}  wall {row['wall_s']:7.2f} s  "
                  f"train {row['train_s']:7.2f} s  test_{row['metric']} {row['test_' + row['metric']]:.2f}", flush=True)
    identical = [same_student(args.work / "plain" / f"run{i}", args.work / "cached" / f"run{i}")
                 for i in range(len(args.weights))]
    total = {c: {k: round(sum(r[k] for r in runs if r["cached"] == (c == "cached")), 2)
                 for k in ("wall_s", "train_s")} for c in ("plain", "cached")}
    later = {c: {k: round(sum(r[k] for r in runs[2:] if r["cached"] == (c == "cached")), 2)
                 for k in ("wall_s", "train_s")} for c in ("plain", "cached")}  # runs 2-4: the reads
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    result = {
        "benchmark": "teacher_cache", "config": args.config, "epochs": args.epochs, "kd_weights": args.weights,
        "runs": runs, "total": total, "runs_2_to_4": later,
        "ratio_wall": round(total["cached"]["wall_s"] / total["plain"]["wall_s"], 3),
        "ratio_train": round(total["cached"]["train_s"] / total["plain"]["train_s"], 3),
        "ratio_wall_runs_2_to_4": round(later["cached"]["wall_s"] / later["plain"]["wall_s"], 3),
        "ratio_train_runs_2_to_4": round(later["cached"]["train_s"] / later["plain"]["train_s"], 3),
        "students_identical": identical, "cache_bytes": size, "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"sweep wall: plain {total['plain']['wall_s']:.1f} s, cached {total['cached']['wall_s']:.1f} s "
          f"(x{result['ratio_wall']}); training loops: {total['plain']['train_s']:.1f} s vs "
          f"{total['cached']['train_s']:.1f} s (x{result['ratio_train']}); runs 2-4 alone: wall "
          f"x{result['ratio_wall_runs_2_to_4']}, loops x{result['ratio_train_runs_2_to_4']}; "
          f"students identical: {all(identical)}; cache {size / 1e6:.2f} MB -> {args.out}")
    if not all(identical):
        raise SystemExit("a cached run's student differs from its plain twin's")


if __name__ == "__main__":
    main()
