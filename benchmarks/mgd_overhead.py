"""What does Matching Guided Distillation cost?  (issue 4, "Overhead")

Measured side by side in one run and written as JSON (``benchmarks/results/mgd_overhead.json``):

1. **Training step**: ``Trainer.train_step`` of MGD-AMP / RD / SM vs Hinton KD on the same teacher/student
   pair, batch and in-memory batches (``featkd.bench.timing``: interleaved rounds, median). Two pairs:
   ResNet-20 -> ResNet-8 (equal widths, one teacher channel per group) and ResNet-20 -> ResNet-8 with
   widths 8-16-32 (two teacher channels per group, so AMP/RD really reduce). Target: MGD <= 1.10 x KD.
2. **Matching update vs epoch**: one ``update_matching`` (statistics pass over N images of the training
   split, eval transforms, both nets in eval mode, + the assignment) relative to one training epoch
   (steps per epoch x the median MGD step, measured above), for several N, on the full 60k Fashion-MNIST
   split and on the 2,000-image data-limited subset. Target: <= 5 % of an epoch.
3. **Stability vs N**: the matching from N images against the one from 20,000 images (share of teacher
   channels assigned identically; cost of the N-image matching on the 20k cost matrix relative to the
   20k optimum), to choose N.
4. **Assignment solve**: ``solve_matching`` (``scipy.optimize.linear_sum_assignment``) for 256, 1024 and
   2048 teacher channels: sc = tc / 2 (ResNet-50 -> MobileNetV1 shapes), non-divisible widths and Sparse
   Matching, on cost matrices from random 7x7 maps. Target: the 2048-channel solve < 1 s.

    python benchmarks/mgd_overhead.py [--threads 1] [--out benchmarks/results/mgd_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from featkd.bench.timing import environment, ratios, time_interleaved, trainer_step
from featkd.config import build_config
from featkd.engine.trainer import Trainer
from featkd.errors import FeatkdError
from featkd.methods.mgd.matching import cost_sums, solve_matching
from featkd.models.zoo import resolve_weights

PAIRS = [["layer1.0.add", "layer1.2.add"], ["layer2.0.add", "layer2.2.add"], ["layer3.0.add", "layer3.2.add"]]


TEACHER: list[str | None] = [None]


def teacher_checkpoint() -> str | None:
    """--teacher-checkpoint, else zoo:fashion-mnist-resnet20 if present, else none (timings do not depend on
    the weights; the stability part does)."""
    if TEACHER[0] is not None:
        return TEACHER[0]
    try:
        resolve_weights("zoo:fashion-mnist-resnet20")
        return "zoo:fashion-mnist-resnet20"
    except FeatkdError:
        return None


def make_trainer(method: dict, student_options: dict, batch: int, subset: int | None,
                 student_checkpoint: str | None = None) -> Trainer:
    raw = {
        "data": {"dataset": "fashion-mnist", "batch_size": batch, "train_subset": subset},
        "teacher": {"model": "resnet20", "checkpoint": teacher_checkpoint()},
        "student": {"model": "resnet8", "options": student_options, "checkpoint": student_checkpoint},
        "method": method,
        "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 1, "device": "cpu", "progress": "off", "tensorboard": False},
    }
    return Trainer(build_config(raw), out_dir=None, log=lambda _m: None)


def mgd(reducer: str, **extra) -> dict:
    return {"name": "mgd", "reducer": reducer, "pairs": PAIRS, **extra}


KD = {"name": "kd", "kd_temperature": 4.0, "ce_weight": 0.5, "kd_weight": 0.5}


def step_times(student_options: dict, batch: int, rounds: int, calls: int) -> tuple[dict, dict[str, Trainer]]:
    trainers = {"kd": make_trainer(KD, student_options, batch, 2000)}
    for r in ("amp", "rd", "sm"):
        t = make_trainer(mgd(r, stats_images=512), student_options, batch, 2000)
        t.distiller.setup(t.context())  # the first matching (training needs one)
        trainers[f"mgd_{r}"] = t
    times = time_interleaved({k: trainer_step(t) for k, t in trainers.items()}, rounds=rounds, calls=calls)
    return {"seconds_per_step": times, "ratio_over_kd": ratios(times, "kd")}, trainers


def updates_and_stability(trainer: Trainer, sizes: list[int], step_s: float) -> dict:
    """One matching update (statistics + solve) per N images of the full training split, timed, and its
    matching compared with the one from the largest N (same weights): share of teacher channels assigned
    identically and the relative excess cost of the N-image matching on the reference cost matrix."""
    d = trainer.distiller
    ctx = trainer.context()
    epoch_s = trainer.steps_per_epoch * step_s
    runs = {}
    for n in sizes:
        d.cfg.stats_images = n
        t0 = time.perf_counter()
        stats = d.collect_statistics(ctx)
        costs = [s.mean_cost().cpu().numpy() for s in stats]
        matchings = [solve_matching(c, d.rule, d.cfg.wide_student) for c in costs]
        sec = time.perf_counter() - t0
        print(f"update on {n} images: {sec:.2f} s = {100 * sec / epoch_s:.2f} % of a {trainer.data.train_size}-image "
              f"epoch ({epoch_s:.1f} s)", flush=True)
        runs[n] = (costs, matchings, sec)
    ref_costs, ref_match, _ = runs[max(sizes)]
    out = {"epoch_seconds": epoch_s, "train_images": trainer.data.train_size, "reference_images": max(sizes),
           "by_images": {}}
    for n, (_costs, matchings, sec) in runs.items():
        rows = []
        for i, m in enumerate(matchings):
            same = np.mean([a == b for a, b in zip(m.teacher_assignment(), ref_match[i].teacher_assignment(),
                                                   strict=True)])
            gap = m.total_cost(ref_costs[i]) / ref_match[i].total_cost(ref_costs[i]) - 1.0
            rows.append({"stage": i, "same_assignment": float(same), "cost_gap": float(gap)})
        out["by_images"][str(n)] = {"update_seconds": sec, "update_over_epoch": sec / epoch_s, "stages": rows}
        print(f"  {n:>5} images vs {max(sizes)}: same " + " ".join(f"{r['same_assignment']:.2f}" for r in rows)
              + " | excess cost " + " ".join(f"{100 * r['cost_gap']:.2f}%" for r in rows))
    return out


def initial_stability(sizes: list[int], batch: int) -> dict:
    """The first solve (fresh student, the hardest case) on the 2k data-limited subset: the matching from N
    images vs the one from all 2,000 (same weights)."""
    trainer = make_trainer(mgd("amp", stats_images=None), {}, batch, 2000)
    d = trainer.distiller
    ctx = trainer.context()
    ref_stats = d.collect_statistics(ctx)
    ref_costs = [s.mean_cost().cpu().numpy() for s in ref_stats]
    ref = [solve_matching(c, d.rule, d.cfg.wide_student) for c in ref_costs]
    out: dict = {"reference_images": int(ref_stats[0].images.item()), "student": "fresh", "by_images": {}}
    for n in sizes:
        d.cfg.stats_images = n
        stats = d.collect_statistics(ctx)
        rows = []
        for i, s in enumerate(stats):
            m = solve_matching(s.mean_cost().cpu().numpy(), d.rule, d.cfg.wide_student)
            same = np.mean([a == b for a, b in zip(m.teacher_assignment(), ref[i].teacher_assignment(), strict=True)])
            gap = m.total_cost(ref_costs[i]) / ref[i].total_cost(ref_costs[i]) - 1.0
            rows.append({"stage": i, "same_assignment": float(same), "cost_gap": float(gap)})
        out["by_images"][str(n)] = rows
        print(f"first solve, {n:>4} images vs 2000: same " + " ".join(f"{r['same_assignment']:.2f}" for r in rows)
              + " | excess cost " + " ".join(f"{100 * r['cost_gap']:.2f}%" for r in rows), flush=True)
    return out


def solve_times(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    cases = [(256, 128, "balanced"), (1024, 512, "balanced"), (2048, 1024, "balanced"),
             (256, 96, "balanced"), (1024, 320, "balanced"), (2048, 1280, "balanced"), (2048, 1000, "balanced"),
             (256, 128, "one_to_one"), (1024, 512, "one_to_one"), (2048, 1024, "one_to_one")]
    for tc, sc, rule in cases:
        # cost of random 7x7 maps over 16 images: a realistic spread (mean ~2, std ~0.1)
        cost = (cost_sums(torch.randn(16, sc, 7, 7), torch.randn(16, tc, 7, 7)) / 16).numpy()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            solve_matching(cost, rule)
            samples.append(time.perf_counter() - t0)
        rows.append({"teacher_channels": tc, "student_channels": sc, "rule": rule,
                     "seconds_median": statistics.median(samples), "seconds_min": min(samples)})
        print(f"solve tc={tc:5d} sc={sc:5d} {rule:10s}: {statistics.median(samples):.3f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="the data-limited protocol's batch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teacher-checkpoint", help="default: zoo:fashion-mnist-resnet20 if present")
    parser.add_argument("--student-checkpoint", help="student weights for the update/stability part "
                        "(default: fresh, as at the first solve)")
    parser.add_argument("--parts", nargs="+", default=["solve", "step", "update", "initial"],
                        help="which measurements (others are kept from an existing --out file)")
    parser.add_argument("--out", default="benchmarks/results/mgd_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    TEACHER[0] = args.teacher_checkpoint
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    out: dict = {**previous, "benchmark": "mgd_overhead", "dataset": "fashion-mnist", "teacher": "resnet20",
                 "teacher_checkpoint": teacher_checkpoint(), "student_checkpoint": args.student_checkpoint,
                 "batch": args.batch, "threads": args.threads,
                 "targets": {"step_ratio_over_kd": 1.10, "update_over_epoch": 0.05, "solve_2048_seconds": 1.0},
                 "load_average_before": os.getloadavg()}

    if "solve" in args.parts:
        out["solve"] = solve_times(repeats=3)
    if "initial" in args.parts:
        out["stability_first_solve_data_limited"] = initial_stability([250, 500, 1000], args.batch)
    if "step" in args.parts or "update" in args.parts:
        step_and_update(args, out)
    out["environment"] = environment()
    out["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


def step_and_update(args: argparse.Namespace, out: dict) -> None:
    out["step"] = {}
    kept = None
    for label, options in (("resnet8", {}), ("resnet8-w8", {"widths": [8, 16, 32]})):
        res, trainers = step_times(options, args.batch, args.rounds, args.calls)
        out["step"][label] = res
        print(f"step {label}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in
                                            ((k, t["median"]) for k, t in res["seconds_per_step"].items()))
              + " | ratio over KD " + ", ".join(f"{k} {v:.3f}" for k, v in res["ratio_over_kd"].items()))
        if label == "resnet8":
            kept = trainers["mgd_amp"]
        del trainers

    # matching update vs one epoch: the full 60k split (N images per update) and the 2k data-limited subset
    step_s = out["step"]["resnet8"]["seconds_per_step"]["mgd_amp"]["median"]
    assert kept is not None
    t0 = time.perf_counter()
    kept.distiller.cfg.stats_images = None
    kept.distiller.update_matching(kept.context())  # the whole 2k subset
    sec = time.perf_counter() - t0
    epoch_limited = kept.steps_per_epoch * step_s
    out["update_data_limited"] = {"images": kept.data.train_size, "update_seconds": sec,
                                  "epoch_seconds": epoch_limited, "update_over_epoch": sec / epoch_limited}
    print(f"update on the whole 2k subset: {sec:.2f} s = {100 * sec / epoch_limited:.1f} % of its epoch")
    del kept
    full = make_trainer(mgd("amp", stats_images=512), {}, args.batch, None, args.student_checkpoint)
    full.distiller.setup(full.context())
    out["update_full_split"] = updates_and_stability(full, [500, 1000, 2000, 5000, 20000], step_s)


if __name__ == "__main__":
    main()
