"""What does CWT cost per training step, relative to Hinton KD?  (issue 5, "step-time ratio CWT / KD")

Builds one featkd ``Trainer`` per config (by default the Fashion-MNIST data-limited protocol: KD, FitNets,
CWT, CWT + KD; same teacher, student, batch size and thread count) and times their full training steps side
by side in one run with :mod:`featkd.bench.timing` (interleaved rounds, median seconds per step, data loading
excluded). Writes the ratios to the KD step as JSON. Target: CWT / KD <= 1.10.

    python benchmarks/cwt_step_time.py [--set teacher.checkpoint=] [--out benchmarks/results/cwt_step_time.json]

``--set`` overrides apply to every config (e.g. ``teacher.checkpoint=`` times with an untrained teacher
when the zoo lacks ``fashion-mnist-resnet20``: the step time does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from featkd.bench.timing import environment, ratios, time_interleaved, trainer_step
from featkd.config import apply_overrides, build_config, load_raw
from featkd.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {
    "kd": "configs/fashion-mnist-kd-resnet20-resnet8.yaml",
    "fitnets": "configs/fashion-mnist-fitnets-resnet20-resnet8.yaml",
    "cwt": "configs/fashion-mnist-cwt-resnet20-resnet8.yaml",
    "cwt+kd": "configs/fashion-mnist-cwt-kd-resnet20-resnet8.yaml",
}
TARGET = 1.10  # issue 5: CWT / Hinton KD step time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, path in DEFAULT_CONFIGS.items():
        parser.add_argument(f"--{name.replace('+', '-')}", dest=name.replace("+", "_"), default=path,
                            help=f"config of the {name!r} entry (default {path})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/cwt_step_time.json")
    args = parser.parse_args()

    configs = {name: getattr(args, name.replace("+", "_")) for name in DEFAULT_CONFIGS}
    trainers, described = {}, {}
    for name, path in configs.items():
        raw = apply_overrides(load_raw(ROOT / path if not Path(path).is_absolute() else path),
                              [*args.set, f"train.device={args.device}", 'train.progress="off"',
                               "train.tensorboard=false"])
        cfg = build_config(raw)
        trainers[name] = Trainer(cfg, out_dir=None, log=lambda _m: None)
        described[name] = {"config": path, "method": cfg.method, "batch_size": cfg.data.batch_size,
                           "teacher": cfg.teacher.model if cfg.teacher else None, "student": cfg.student.model,
                           "num_threads": cfg.train.num_threads}
    device = trainers["kd"].device
    times = time_interleaved({name: trainer_step(t) for name, t in trainers.items()}, rounds=args.rounds,
                             calls=args.calls, device=device)
    rel = ratios(times, "kd")
    for name in trainers:
        print(f"{name:>8}: {times[name]['median'] * 1e3:7.1f} ms/step  ratio to kd {rel[name]:.3f}")
    verdict = "meets" if rel["cwt"] <= TARGET else "MISSES"
    print(f"CWT / KD = {rel['cwt']:.3f} ({verdict} the target <= {TARGET})")
    out = {"benchmark": "cwt_step_time", "reference": "kd", "target_ratio_cwt_over_kd": TARGET,
           "ratio_cwt_over_kd": rel["cwt"], "ratios_to_kd": rel, "seconds_per_step": times,
           "rounds": args.rounds, "calls": args.calls, "overrides": args.set, "configs": described,
           "device": str(device), "environment": environment()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
