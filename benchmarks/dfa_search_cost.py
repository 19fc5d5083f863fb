"""What does DFA's search cost, relative to the stage-2 distillation it prepares?  (issue 7, target <= 1.0)

Two numbers, both written to JSON:

1. *Predicted from step times measured side by side* (interleaved rounds, medians, one process): one
   search iteration of each group (architecture step on a held-out batch + weight step on a weight batch)
   and one stage-2 training step of the same config (``Trainer.train_step``, the searched alpha frozen),
   plus the ``last`` ablation's step (= FitNets on the group outputs) for the stage-2 overhead of
   aggregating every candidate. ``search / stage 2 = sum_g epochs * batches * t_iter_g / (epochs_2 *
   steps_per_epoch * t_step)``.
2. *Measured end to end*, when runs of the config exist under ``--runs`` (default ``runs/bench/data-limited/dfa/seed*``,
   the ``featkd bench data-limited`` cells):
   the search's wall time (``alpha.json: search_seconds``) over the same run's stage-2 ``train_seconds``.

    python benchmarks/dfa_search_cost.py [--config configs/fashion-mnist-dfa-resnet20-resnet8.yaml]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from featkd.bench.timing import environment, time_interleaved, trainer_step
from featkd.config import load_config
from featkd.engine.trainer import Trainer
from featkd.methods.dfa.distiller import DFA
from featkd.methods.dfa.search import BridgeSearch, IndexBatches, split_indices


def search_iteration(trainer: Trainer, groups: list[int]) -> tuple[Callable[[], None], int]:
    """One search iteration of ``groups`` (arch step + weight step) on fixed batches of the real split."""
    dfa = trainer.distiller
    assert isinstance(dfa, DFA)
    scfg, ctx = dfa.cfg.search, trainer.context()
    weight_idx, held_idx = split_indices(ctx.data.train_size, scfg.held_out_fraction, 0)
    weight = next(IndexBatches(ctx.data, weight_idx, scfg.batch_size, ctx.device, 1).epoch())
    held = next(IndexBatches(ctx.data, held_idx, scfg.batch_size, ctx.device, 2).epoch())
    capture = ctx.teacher_capture
    engine = BridgeSearch(scfg, dfa.pairs, ctx.student, lambda x: capture(x)[1],
                          torch.zeros(2, *dfa.input_shape, device=ctx.device), 1000, ctx.autocast)

    def step() -> None:
        engine.arch_step(*held, groups, weight)
        engine.weight_step(*weight, groups)

    return step, len(IndexBatches(ctx.data, weight_idx, scfg.batch_size, ctx.device, 1))


def measured_runs(runs: Path) -> list[dict]:
    rows = []
    for seed_dir in sorted(runs.glob("seed*")):
        alpha, summary = seed_dir / "alpha.json", seed_dir / "summary.json"
        if alpha.is_file() and summary.is_file():
            s = json.loads(summary.read_text())
            a = json.loads(alpha.read_text())
            if a.get("search_seconds") and s.get("train_seconds"):
                rows.append({"run": str(seed_dir), "search_seconds": a["search_seconds"],
                             "stage2_seconds": s["train_seconds"],
                             "ratio": a["search_seconds"] / s["train_seconds"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion-mnist-dfa-resnet20-resnet8.yaml")
    parser.add_argument("--runs", help="folder with seed*/ runs of the config (default runs/bench/data-limited/dfa)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the protocol uses 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--out", help="default benchmarks/results/dfa_search_cost-<config stem>.json")
    args = parser.parse_args()
    stem = Path(args.config).stem
    quiet = lambda _m: None  # noqa: E731
    common = [f"train.device={args.device}", f"train.num_threads={args.threads}", "train.progress=off",
              "train.tensorboard=false", *args.overrides]
    dfa_trainer = Trainer(load_config(args.config, common), out_dir=None, log=quiet)
    dfa = dfa_trainer.distiller
    assert isinstance(dfa, DFA), f"{args.config} is not a dfa config"
    dfa.set_alphas([torch.full_like(a, 1.0 / a.numel()) for a in dfa.alphas()], "benchmark")
    last_trainer = Trainer(load_config(args.config, [*common, "method.aggregation=last"]), out_dir=None, log=quiet)
    fns = {"stage2_step": trainer_step(dfa_trainer), "last_step": trainer_step(last_trainer)}
    scfg, tc = dfa.cfg.search, dfa_trainer.cfg.train
    stages = [list(range(len(dfa.pairs)))] if scfg.schedule == "joint" else [[g] for g in range(len(dfa.pairs))]
    names = ["search_iter_" + "+".join(f"group{g + 1}" for g in st) for st in stages]
    batches = 0
    for name, st in zip(names, stages, strict=True):
        fns[name], batches = search_iteration(dfa_trainer, st)
    times = time_interleaved(fns, rounds=args.rounds, calls=args.calls, device=dfa_trainer.device)
    iters_per_stage = scfg.epochs * batches
    per_group = [times[name]["median"] for name in names]
    search_s = iters_per_stage * sum(per_group)
    stage2_s = tc.epochs * dfa_trainer.steps_per_epoch * times["stage2_step"]["median"]
    predicted = search_s / stage2_s
    for name, t in times.items():
        print(f"{name:>20}: {t['median'] * 1e3:8.1f} ms")
    print(f"search {search_s:.1f}s ({len(per_group)} stage(s) x {iters_per_stage} iterations) vs stage 2 "
          f"{stage2_s:.1f}s ({tc.epochs} x {dfa_trainer.steps_per_epoch} steps): ratio {predicted:.3f} (target <= 1.0)")
    print(f"stage-2 step DFA / last (= FitNets): {times['stage2_step']['median'] / times['last_step']['median']:.3f}")
    measured = measured_runs(Path(args.runs or "runs/bench/data-limited/dfa"))
    if measured:
        ratios = [r["ratio"] for r in measured]
        print(f"measured in {len(measured)} run(s): search / stage 2 = {statistics.fmean(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    out = {
        "benchmark": "dfa_search_cost", "config": args.config, "device": args.device, "target_ratio": 1.0,
        "search": {"schedule": scfg.schedule, "epochs_per_stage": scfg.epochs, "batches_per_epoch": batches,
                   "batch_size": scfg.batch_size, "held_out_fraction": scfg.held_out_fraction},
        "stage2": {"epochs": tc.epochs, "steps_per_epoch": dfa_trainer.steps_per_epoch},
        "seconds_per_call": times, "predicted_search_seconds": search_s, "predicted_stage2_seconds": stage2_s,
        "predicted_ratio_search_over_stage2": predicted,
        "stage2_step_ratio_dfa_over_last": times["stage2_step"]["median"] / times["last_step"]["median"],
        "measured_runs": measured,
        "measured_ratio_mean": statistics.fmean(r["ratio"] for r in measured) if measured else None,
        "environment": environment(),
    }
    path = Path(args.out or f"benchmarks/results/dfa_search_cost-{stem}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
