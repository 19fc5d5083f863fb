"""Side-by-side timing helpers for the benchmarks (``benchmarks/``, ``featkd bench``).

These machines are noisy, so costs are reported as *ratios measured in one run*: the functions being
compared are timed in interleaved rounds (A B C A B C ...) and each gets the median of its rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int = 7, calls: int = 10, warmup: int = 3,
                     device: torch.device | str | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, Any]]:
    """Seconds per call of each function: ``{name: {"median": s, "min": s, "rounds": n, "samples": [s, ...]}}``.

    Every function is warmed up ``warmup`` times, then timed for ``calls`` consecutive calls in each of
    ``rounds`` rounds, the functions alternating within each round so drift hits them alike. ``samples`` are
    the rounds' seconds per call in order (round ``r`` of every function ran side by side: see
    :func:`paired_ratios`). ``clock``: wall time by default; ``time.process_time`` counts only this process's
    CPU time, which other jobs on a crowded CPU machine do not inflate (not for a GPU: it misses the device time).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            t0 = clock()
            for _ in range(calls):
                fn()
            synchronize(device)
            samples[name].append((clock() - t0) / calls)
    return {name: {"median": statistics.median(s), "min": min(s), "rounds": len(s), "samples": s}
            for name, s in samples.items()}


def trainer_step(trainer: Any, batches: int = 4) -> Callable[[], None]:
    """A function running one full training step of ``trainer`` (a featkd Trainer) on in-memory batches.

    The batches are drawn once from the trainer's own loader, so data loading is excluded (it is the same
    for every method) while everything the trainer does per step is included; each keeps its training-split
    indices (the loader's ``batch_indices``) for the methods that need them (CRD's memory bank).
    """
    loader = trainer.train_loader
    loader.set_epoch(0)
    fixed = []
    for x, y in loader:
        fixed.append((x, y, getattr(loader, "batch_indices", None)))
        if len(fixed) == batches:
            break
    return step_on(trainer, fixed)


def step_on(trainer: Any, batches: Sequence[tuple[Any, ...]]) -> Callable[[], None]:
    """A function running ``trainer.train_step`` on the given ``(x, y[, indices])`` batches in turn (epoch 0)."""
    state = {"i": 0}

    def step() -> None:
        x, y, *indices = batches[state["i"] % len(batches)]
        state["i"] += 1
        trainer.train_step(x, y, 0, *indices)

    return step


def ratios(times: Mapping[str, Mapping[str, float]], reference: str) -> dict[str, float]:
    """Median step time of each entry divided by the reference entry's."""
    ref = times[reference]["median"]
    return {name: t["median"] / ref for name, t in times.items()}


def paired_ratios(times: Mapping[str, Mapping[str, Any]], name: str, reference: str) -> dict[str, float]:
    """The ratio ``name / reference`` round by round (each round timed both side by side): its median and
    spread (``min``, ``q1``, ``q3``, ``max`` over the rounds), from :func:`time_interleaved`'s ``samples``."""
    per_round = sorted(a / b for a, b in zip(times[name]["samples"], times[reference]["samples"], strict=True))
    q1, _, q3 = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else per_round * 3
    return {"median": statistics.median(per_round), "min": per_round[0], "q1": q1, "q3": q3, "max": per_round[-1],
            "rounds": len(per_round)}


def environment() -> dict[str, Any]:
    """Where a benchmark ran: recorded with every JSON result."""
    import os
    import platform

    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return info
