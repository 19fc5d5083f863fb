"""What does a two-teacher label-free step cost in featkd against a hand-written loop, and what does the
teacher cache save in a sweep?  (issue 26, "Speed")

1. Step: the label-free Fashion-MNIST run of two teachers (the zoo's ResNet-20 at the data's 28 px, and the
   same weights seen at 40 px: two members with their own views) into a ResNet-8, ``multiteacher`` on both
   teachers' last stages (1x1 adaptors, channel standardisation, MSE). ``Trainer.train_step`` against the loop a
   user would write: forward hooks on the three models, each teacher's view (de-normalise, resize,
   re-normalise), the adaptors, the standardised targets, MSE, backward, SGD over the student and the adaptors.
   Same weights, batches and optimiser; interleaved rounds, per-round ratios, this process's CPU time.
2. Sweep: four runs of one stream (``method.weights`` of the second teacher 0.25 / 0.5 / 1 / 2), each a
   ``featkd train`` process, without and with ``train.teacher_cache`` (a fresh folder: the first run writes
   both teachers' outputs, the other three read them), interleaved run by run; the sum of ``train_seconds``.

    PYTHONPATH=. python benchmarks/multiteacher_step.py [--batch 128] [--rounds 7] [--sweep-subset 2000]
        [--work runs/multiteacher_step] [--out benchmarks/results/multiteacher_step.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from featkd.bench.timing import environment, paired_ratios, time_interleaved, trainer_step
from featkd.config import build_config
from featkd.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
FMNIST_VIEW = {"mean": [0.2860], "std": [0.3530]}


def config(batch: int, subset: int, epochs: int = 1) -> dict[str, Any]:
    return {
        "name": "multiteacher-step",
        "data": {"dataset": "fashion-mnist", "labels": "ignore", "train_subset": subset, "batch_size": batch},
        "teachers": {"near": {"model": "resnet20", "checkpoint": "zoo:fashion-mnist-resnet20"},
                     "far": {"model": "resnet20", "checkpoint": "zoo:fashion-mnist-resnet20", "input_size": 40,
                             **FMNIST_VIEW}},
        "student": {"model": "resnet8"},
        "method": {"name": "multiteacher", "pairs": [["layer3", "near:layer3"], ["layer3", "far:layer3"]],
                   "adaptor": "conv1x1", "standardize": "channel", "loss": "mse", "stats_images": 512,
                   "agree_images": 0},
        "optim": {"lr": 0.05, "schedule": "constant", "weight_decay": 5e-4},
        "train": {"epochs": epochs, "num_threads": 1, "progress": "off", "tensorboard": False, "teacher_eval": "off",
                  "eval_every": epochs},
    }


def hand_written_step(trainer: Trainer, batches: list) -> Any:
    """The two-teacher loop written by hand on copies of the trainer's models, adaptors and statistics."""
    distiller = trainer.distiller
    student = copy.deepcopy(trainer.student).train()
    ensemble = trainer.teacher
    teachers = {name: copy.deepcopy(ensemble.get_submodule(name)).eval().requires_grad_(False)
                for name in ensemble.member_names}
    adaptors = copy.deepcopy(distiller.adaptors)
    stats = [(getattr(distiller, f"mean_{i}").view(1, -1, 1, 1), getattr(distiller, f"std_{i}").view(1, -1, 1, 1))
             for i in range(len(distiller.pairs))]
    data_mean, data_std = ensemble.data_mean, ensemble.data_std
    views = {name: ensemble.views[name] for name in teachers}
    feats: dict[str, torch.Tensor] = {}
    hooks = [student.layer3.register_forward_hook(lambda _m, _i, o: feats.__setitem__("s", o))]
    hooks += [t.layer3.register_forward_hook(lambda _m, _i, o, n=n: feats.__setitem__(n, o))
              for n, t in teachers.items()]
    oc = trainer.cfg.optim
    opt = torch.optim.SGD([*student.parameters(), *adaptors.parameters()], lr=oc.lr, momentum=oc.momentum,
                          nesterov=oc.nesterov, weight_decay=oc.weight_decay)
    state = {"i": 0}

    def view(name: str, x: torch.Tensor) -> torch.Tensor:
        v = views[name]
        if v.size is None and v.mean is None:
            return x
        raw = x * data_std + data_mean
        if v.size is not None:
            raw = F.interpolate(raw, size=v.size, mode="bilinear", align_corners=False)
        mean = torch.tensor(v.mean).view(1, -1, 1, 1) if v.mean is not None else data_mean
        std = torch.tensor(v.std).view(1, -1, 1, 1) if v.std is not None else data_std
        return (raw - mean) / std

    def step() -> None:
        x, _y, *_ = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.no_grad():
            for name, teacher in teachers.items():
                teacher(view(name, x))
        student(x)
        loss = 0.0
        for i, name in enumerate(teachers):
            mean, std = stats[i]
            target = (feats[name] - mean) / std
            pred = adaptors[i](feats["s"])
            if pred.shape[-2:] != target.shape[-2:]:
                pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    step.hooks = hooks  # type: ignore[attr-defined]
    return step


def measure_step(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    trainer = Trainer(build_config(config(args.batch, 2000)), None, log=lambda _m: None)
    trainer.distiller.setup(trainer.context())
    featkd_step = trainer_step(trainer)
    loader = trainer.train_loader
    loader.set_epoch(0)
    batches = [b for _, b in zip(range(4), loader)]
    hand = hand_written_step(trainer, batches)
    times = time_interleaved({"hand": hand, "featkd": featkd_step}, rounds=args.rounds, calls=5,
                             clock=time.process_time)
    ratio = paired_ratios(times, "featkd", "hand")
    return {"batch": args.batch, "hand_s": times["hand"]["median"], "featkd_s": times["featkd"]["median"],
            "ratio": ratio, "target": 1.05, "clock": "process_time"}


def train_run(cfg: dict[str, Any], out: Path, weight: float, cache: Path | None) -> dict[str, Any]:
    raw = copy.deepcopy(cfg)
    raw["method"]["weights"] = {"far": weight}
    if cache is not None:
        raw["train"]["teacher_cache"] = str(cache)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.in.yaml").write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featkd", "train", str(out / "config.in.yaml"), "--out",
                           str(out / "run")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    summary = json.loads((out / "run" / "summary.json").read_text())
    return {"weight": weight, "wall_s": time.perf_counter() - t0, "train_s": summary["train_seconds"],
            "teacher_cache": summary.get("teacher_cache")}


def measure_sweep(args: argparse.Namespace) -> dict[str, Any]:
    if args.work.exists():
        shutil.rmtree(args.work)
    cfg = config(args.batch, args.sweep_subset, epochs=args.sweep_epochs)
    plain, cached = [], []
    for w in (0.25, 0.5, 1.0, 2.0):  # interleaved run by run
        plain.append(train_run(cfg, args.work / f"plain-{w}", w, None))
        cached.append(train_run(cfg, args.work / f"cached-{w}", w, args.work / "cache"))
    total = {k: sum(r["train_s"] for r in rs) for k, rs in (("plain", plain), ("cached", cached))}
    return {"runs": {"plain": plain, "cached": cached}, "train_s": total,
            "cached_over_plain": total["cached"] / total["plain"], "subset": args.sweep_subset,
            "epochs": args.sweep_epochs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sweep-subset", type=int, default=2000)
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "multiteacher_step")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multiteacher_step.json")
    args = parser.parse_args()
    step = measure_step(args)
    print(f"step: featkd {step['featkd_s'] * 1e3:.1f} ms, hand-written {step['hand_s'] * 1e3:.1f} ms, ratio "
          f"{step['ratio']['median']:.3f} (rounds {step['ratio']['min']:.3f}-{step['ratio']['max']:.3f})", flush=True)
    sweep = measure_sweep(args)
    print(f"sweep of 4 runs: {sweep['train_s']['plain']:.1f} s without the cache, {sweep['train_s']['cached']:.1f} s "
          f"with it ({sweep['cached_over_plain']:.2f})")
    payload = {"benchmark": "multiteacher_step", "command": " ".join(["python", *sys.argv]), "step": step,
               "sweep": sweep, "environment": environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
