"""Distilling into an already-trained student: does one epoch of MGD keep its accuracy?  (issue 4)

MGD's selling point: apart from a per-channel norm it adds no parameters, so distilling into a trained
student does not first have to undo a random adapter. In one run, from the same converged ResNet-8
(``zoo:fashion-mnist-resnet8``, trained on all 60k Fashion-MNIST images, or ``--student-checkpoint``), this
measures the test accuracy (full 10k test split)

* before any training,
* after one epoch of MGD-AMP (the ``configs/fashion-mnist-mgd-amp-resnet20-resnet8.yaml`` options, i.e.
  ``normalizer: scaled`` = 625, and the same with the official normaliser 1e4),
* after one epoch of FitNets with a freshly initialised 1x1 connector (``[layer3, layer3]``, weight 1,
  the ``configs/fashion-mnist-fitnets-resnet20-resnet8.yaml`` options),
* after one epoch of cross-entropy only fine-tuning (the reference: what the optimiser alone does),

for seeds 0, 1, 2 (seed: batch order, connector initialisation, RD draws). Teacher: ``zoo:fashion-mnist-resnet20``.

The epoch runs over the data-limited protocol's training set (the seeded, class-stratified 2,000-image
subset of ``configs/base/fashion-mnist-data-limited.yaml``: 31 steps of 64), since that is the setting in
which this project distils; ``--subset 10000`` uses a larger fixed subset (156 steps). The optimiser is the
protocol's SGD (momentum 0.9, nesterov, weight decay 5e-4) at the learning rate the official MGD code uses
for ImageNet-pretrained students on CUB (0.01), cosine-annealed over the epoch; ``--lr`` changes it.

    python benchmarks/pretrained_student.py [--student-checkpoint PATH] [--subset N] [--lr LR]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from featkd.bench.timing import environment
from featkd.config import build_config, load_raw
from featkd.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def method_section(config: str) -> dict:
    """The ``method`` section of one of the repository's configs, so this script uses the same options."""
    return load_raw(ROOT / "configs" / config)["method"]


def run_one(base: dict, method: dict, seed: int, student_ckpt: str) -> float:
    raw = copy.deepcopy(base)
    raw["method"] = method
    raw["student"]["checkpoint"] = student_ckpt
    raw["train"].update({"seed": seed, "epochs": 1, "eval_every": 1, "tensorboard": False, "save_best": False})
    trainer = Trainer(build_config(raw), out_dir=None, log=lambda _m: None)
    return float(trainer.fit().test_acc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-checkpoint", default="zoo:fashion-mnist-resnet8")
    parser.add_argument("--teacher-checkpoint", default="zoo:fashion-mnist-resnet20")
    parser.add_argument("--subset", type=int, default=2000, help="training images for the one epoch")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/pretrained_student.json")
    args = parser.parse_args()

    base = load_raw(ROOT / "configs" / "base" / "fashion-mnist-data-limited.yaml")
    base["data"]["train_subset"] = args.subset
    base["teacher"]["checkpoint"] = args.teacher_checkpoint
    base["optim"]["lr"] = args.lr
    methods = {
        "ce": {"name": "none"},
        "mgd_amp": method_section("fashion-mnist-mgd-amp-resnet20-resnet8.yaml"),
        "mgd_amp_official_normalizer": {**method_section("fashion-mnist-mgd-amp-resnet20-resnet8.yaml"),
                                        "normalizer": 1e4},
        "fitnets": method_section("fashion-mnist-fitnets-resnet20-resnet8.yaml"),
    }
    # accuracy before: the checkpoint evaluated by the same trainer code (no training step)
    probe = copy.deepcopy(base)
    probe["method"] = {"name": "none"}
    probe["student"]["checkpoint"] = args.student_checkpoint
    trainer = Trainer(build_config(probe), out_dir=None, log=lambda _m: None)
    before, _ = trainer.evaluate(trainer.student)
    print(f"before: {before:.2f}")
    results: dict = {name: {} for name in methods}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for name, method in methods.items():
            acc = run_one(base, method, seed, args.student_checkpoint)
            results[name][str(seed)] = acc
            print(f"seed {seed} {name:8s}: {acc:.2f} ({acc - before:+.2f})", flush=True)
            write(args, base, methods, before, results, time.perf_counter() - t0)  # partial results survive
    write(args, base, methods, before, results, time.perf_counter() - t0, final=True)


def write(args: argparse.Namespace, base: dict, methods: dict, before: float, results: dict, seconds: float,
          final: bool = False) -> None:
    summary = {}
    for name, accs in results.items():
        if not accs:
            continue
        values = list(accs.values())
        deltas = [v - before for v in values]
        summary[name] = {"mean": statistics.mean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "delta_mean": statistics.mean(deltas), "delta_min": min(deltas),
                         "delta_max": max(deltas)}
        if final:
            print(f"{name:8s}: {summary[name]['mean']:.2f} +- {summary[name]['std']:.2f} "
                  f"(delta {summary[name]['delta_mean']:+.2f}, worst {summary[name]['delta_min']:+.2f})")
    out = {
        "benchmark": "pretrained_student", "student_checkpoint": args.student_checkpoint,
        "teacher_checkpoint": args.teacher_checkpoint, "train_images": args.subset, "epochs": 1,
        "lr": args.lr, "batch": base["data"]["batch_size"], "seeds": args.seeds, "methods": methods,
        "test_acc_before": before, "test_acc_after": results, "summary": summary,
        "targets": {"mgd_max_drop": 0.5, "fitnets": "drops"},
        "seconds": seconds, "complete": final, "environment": environment(),
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if final:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
