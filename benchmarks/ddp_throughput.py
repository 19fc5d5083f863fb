"""Throughput of 2 DDP processes (gloo, CPU) vs 1 process, on the same machine, config and global batch.

Runs, in one go: ``featkd train`` in one process with all the machine's threads, then
``torchrun --nproc_per_node=2`` with the threads split between the ranks, each for the same epochs, and
compares the training images/s recorded in ``metrics.jsonl`` (the first epoch is dropped as warm-up when
there are several). Whatever it is, it is reported: on 2 cores DDP cannot win much, the point is to know.

    python benchmarks/ddp_throughput.py [--config configs/fashion-mnist-kd-resnet20-resnet8.yaml] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from featkd.bench.timing import environment

ROOT = Path(__file__).resolve().parents[1]


def images_per_s(run: Path) -> float:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recs = recs[1:] if len(recs) > 1 else recs
    return statistics.fmean(r["train_images_per_s"] for r in recs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion-mnist-kd-resnet20-resnet8.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the machine to use")
    parser.add_argument("--out", default="benchmarks/results/ddp_throughput.json")
    args = parser.parse_args()
    common = ["--set", f"train.epochs={args.epochs}", "--set", f"train.eval_every={args.epochs}",
              "--set", "train.progress=off", "--set", "train.tensorboard=false"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "1 process": ([sys.executable, "-m", "featkd", "train", args.config, *common,
                           "--set", f"train.num_threads={args.threads}"], args.threads),
            "2 processes (gloo)": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "-m", "featkd", "train", args.config, *common,
                                    "--set", f"train.num_threads={max(1, args.threads // 2)}"],
                                   max(1, args.threads // 2)),
        }
        for name, (cmd, threads) in runs.items():
            out = Path(tmp) / name.split()[0]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
            results[name] = {"train_images_per_s": images_per_s(out),
                             "test_acc": json.loads((out / "summary.json").read_text())["test_acc"]}
            print(f"{name}: {results[name]['train_images_per_s']:.0f} train images/s")
    ratio = results["2 processes (gloo)"]["train_images_per_s"] / results["1 process"]["train_images_per_s"]
    print(f"2 processes / 1 process: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "ddp_throughput", "config": args.config,
                                          "epochs": args.epochs, "results": results, "ratio_2_over_1": ratio,
                                          "environment": environment()}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
