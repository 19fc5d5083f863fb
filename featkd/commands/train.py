"""``featkd train CONFIG [--set key=value ...] [--epochs N] [--out DIR] [--resume [auto]]``.

``train.stop_after`` applies to the command that gives it: ``--resume`` without it goes on to ``train.epochs``
(the run's ``config.yaml`` keeps the value that stopped it).

Exit status: 0 when the run ends (finished, or stopped by ``train.stop_after``); 2 for a user error (one line,
also a checkpoint that cannot be written, or a folder that another live run holds); 128 + the signal's number
when a stop signal ended it after writing a mid-epoch checkpoint (143 for SIGTERM, 138 for SIGUSR1: as if killed
by it, so schedulers and ``torchrun`` see a preempted job); 1 for a bug (traceback).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

HELP = "train a student (or a teacher, with method none) from a YAML config"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (optional with --resume: the run's config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.1 (repeatable)")
    p.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    p.add_argument("--seed", type=int, help="shortcut for --set train.seed=N")
    p.add_argument("--data-dir", help="shortcut for --set data.data_dir=PATH")
    p.add_argument("--device", help="shortcut for --set train.device=DEVICE (auto, cpu, cuda, cuda:N)")
    p.add_argument("--out", help="run folder (default: runs/<config name>, a fresh one if it exists)")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode, metavar="auto",
                   help="continue the run in --out from its last good checkpoint; --resume auto: the same when "
                        "--out holds one, else start fresh (for torchrun --max-restarts)")


def _resume_mode(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {value!r} (put CONFIG before --resume)")
    return value


def shortcut_overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.overrides)
    for flag, key in (("epochs", "train.epochs"), ("seed", "train.seed"), ("data_dir", "data.data_dir"),
                      ("device", "train.device")):
        value = getattr(args, flag, None)
        if value is not None:
            extra.append(f"{key}={value}")
    return extra


def default_out_dir(config: str | None) -> Path:
    stem = Path(config).stem if config else "run"
    out = Path("runs") / stem
    k = 1
    while (out / "last.pt").exists():  # never write into an existing run unless resuming
        k += 1
        out = Path("runs") / f"{stem}-{k}"
    return out


def run(args: argparse.Namespace) -> int:
    from featkd.config import load_config, parse_override
    from featkd.engine import runfolder
    from featkd.engine.trainer import Trainer
    from featkd.errors import FeatkdError

    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a log file or a job's output gets each line as it is printed
    config = args.config
    if args.resume and args.out is None:
        raise FeatkdError("--resume needs --out DIR (the run folder holding last.pt)")
    if config is None:
        if not args.resume:
            raise FeatkdError("give a CONFIG file (or --resume --out DIR to continue a run)")
        config = str(Path(args.out) / "config.yaml")
    out = Path(args.out) if args.out else default_out_dir(args.config)
    overrides = shortcut_overrides(args)
    if args.resume and runfolder.holds_checkpoint(out) and not any(
            parse_override(item)[0] == ["train", "stop_after"] for item in overrides):
        # a stop belongs to the command that gave it: the run's config.yaml keeps the one that stopped it, and
        # a resume without one of its own goes on to train.epochs (else it would stop there again, every time)
        overrides.append("train.stop_after=null")
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # how this run was made, for the zoo manifest and for people
        launcher = "torchrun ... -m featkd" if os.environ.get("WORLD_SIZE", "1") != "1" else "featkd"
        with open(out / "command.txt", "a") as f:
            f.write(" ".join([launcher, *map(shlex.quote, sys.argv[1:])]) + "\n")
    result = trainer.fit()
    if result.stop_signal is not None:  # preempted: the one line was printed, last.pt holds the step
        return 128 + result.stop_signal
    if result.test_metric is not None and os.environ.get("RANK", "0") == "0":
        stopped = result.status == "stopped"  # by train.stop_after: say that it is not the end of the schedule
        epochs = f"{result.epochs} of {cfg.train.epochs}" if stopped else f"{result.epochs}"
        more = f"; continue with featkd train --resume --out {shlex.quote(str(out))}" if stopped else ""
        print(f"done: test_{result.metric} {result.test_metric:.2f} after {epochs} epochs "
              f"({result.train_seconds:.1f}s); outputs in {out}{more}")
    return 0
