"""The demo: distil students on scikit-learn's digits with every method, and print a results table.

It is the main job in miniature, on data that ships with scikit-learn (no download):

1. the teacher: ``zoo:digits-resnet20`` (trained by ``configs/digits-none-resnet20.yaml``); if the zoo
   lacks it, it is trained on the spot with that config;
2. one student run per seed for every ``configs/digits-<method>-resnet20-resnet8.yaml`` (plus
   ``digits-none-resnet8.yaml``, the no-distillation baseline): a ResNet-8 on a seeded, class-stratified
   300-image subset of the training split, where distillation matters (``configs/base/digits.yaml``);
3. a table: method, test accuracy mean +- std over seeds, delta vs. the no-distillation student,
   and mean train time per run; optionally the same as JSON.

A new method joins the demo by adding its ``configs/digits-<method>-resnet20-resnet8.yaml``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from featkd import resources
from featkd.config import apply_overrides, build_config, load_raw
from featkd.errors import FeatkdError, did_you_mean

TEACHER_CONFIG = "digits-none-resnet20.yaml"
BASELINE_CONFIG = "digits-none-resnet8.yaml"
PAIR_SUFFIX = "-resnet20-resnet8.yaml"


def configs_dir() -> Path:
    """The demo's configs: $FEATKD_CONFIGS, else the shipped example configs (:mod:`featkd.resources`)."""
    folder = resources.configs_dir()
    if not (folder / BASELINE_CONFIG).is_file():
        raise FeatkdError(f"no demo configs found ({BASELINE_CONFIG} is not in {folder})"
                          + ("; FEATKD_CONFIGS points there" if os.environ.get("FEATKD_CONFIGS") else ""))
    return folder


def demo_configs() -> dict[str, Path]:
    """``{method label: config path}``: the baseline first, then kd, then the others alphabetically."""
    folder = configs_dir()
    found = {p.name[len("digits-"):-len(PAIR_SUFFIX)]: p for p in folder.glob(f"digits-*{PAIR_SUFFIX}")}
    order = sorted(found, key=lambda m: (m != "kd", m))
    return {"none": folder / BASELINE_CONFIG, **{m: found[m] for m in order}}


def obtain_teacher(work_dir: Path, log: Callable[[str], None]) -> str:
    """The teacher checkpoint: ``zoo:digits-resnet20`` if present, else one trained now into ``work_dir``."""
    from featkd.models.zoo import resolve_weights

    try:
        resolve_weights("zoo:digits-resnet20")
        return "zoo:digits-resnet20"
    except FeatkdError as exc:
        log(f"{exc}; training the teacher now")
    from featkd.engine.trainer import train

    out = work_dir / "teacher"
    if not (out / "student.pt").is_file():
        raw = apply_overrides(load_raw(configs_dir() / TEACHER_CONFIG), ["train.progress=off"])
        train(build_config(raw), out, resume=(out / "last.pt").is_file(), log=log)
    return str(out / "student.pt")


def _train_one(config: str, overrides: list[str]) -> tuple[float, float | None, float]:
    """Train one student in this process: (test accuracy, teacher test accuracy, seconds)."""
    from featkd.engine.trainer import train

    cfg = build_config(apply_overrides(load_raw(config), overrides))
    t0 = time.perf_counter()
    result = train(cfg, out_dir=None, log=lambda _msg: None)
    return result.test_acc, result.teacher_test_acc, time.perf_counter() - t0


def default_jobs() -> int:
    """Two student runs at a time where there are two cores or more (the runs are small: one thread each)."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_demo(methods: Sequence[str] | None = None, seeds: int = 3, epochs: int | None = None,
             work_dir: str | Path = "runs/demo", log: Callable[[str], None] = print,
             jobs: int | None = None) -> list[dict[str, Any]]:
    """Train every (method, seed) student and return one row per method.

    With ``jobs > 1`` the runs go to that many worker processes, each with ``cores // jobs`` torch threads:
    digits models are so small that one thread per run and one run per core is the fastest use of a CPU.
    A run's result depends on its seed and (in the last bits) on its thread count, not on the order of runs.
    """
    available = demo_configs()
    chosen = list(methods or available)
    for m in chosen:
        if m not in available:
            raise FeatkdError(f"--methods: no demo config for {m!r}{did_you_mean(m, available)} "
                              f"(available: {', '.join(available)})")
    jobs = max(1, jobs or default_jobs())
    threads = max(1, (os.cpu_count() or 1) // jobs)
    teacher = obtain_teacher(Path(work_dir), log)
    tasks = []
    for m in chosen:
        for seed in range(seeds):
            overrides = [f"train.seed={seed}", "train.progress=off", "train.tensorboard=false",
                         f"teacher.checkpoint={teacher}", f"train.num_threads={threads}"]
            if epochs is not None:
                overrides += [f"train.epochs={epochs}", f"train.eval_every={epochs}"]
            tasks.append((m, seed, str(available[m]), overrides))
    results: dict[tuple[str, int], tuple[float, float | None, float]] = {}

    def record(m: str, seed: int, outcome: tuple[float, float | None, float]) -> None:
        results[(m, seed)] = outcome
        log(f"  {m:<12} seed {seed}: test_acc {outcome[0]:.2f}  ({outcome[2]:.1f}s)")

    if jobs == 1:
        for m, seed, config, overrides in tasks:
            record(m, seed, _train_one(config, overrides))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: a fresh interpreter per worker (fork after torch started its thread pools can hang)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_one, config, overrides): (m, seed) for m, seed, config, overrides in tasks}
            for future in as_completed(futures):
                record(*futures[future], future.result())
    rows = []
    for m in chosen:
        accs = [results[(m, seed)][0] for seed in range(seeds)]
        times = [results[(m, seed)][2] for seed in range(seeds)]
        rows.append({
            "method": m, "config": str(available[m]), "seeds": seeds, "accs": accs,
            "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if seeds > 1 else 0.0,
            "train_s": statistics.fmean(times), "teacher_test_acc": results[(m, 0)][1],
        })
    base = next((r["acc_mean"] for r in rows if r["method"] == "none"), None)
    for r in rows:
        r["delta_vs_none"] = None if base is None else r["acc_mean"] - base
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<14} {'test acc (mean +- std)':>23} {'delta vs none':>14} {'train time':>11}"]
    for r in rows:
        delta = "" if r["delta_vs_none"] is None else f"{r['delta_vs_none']:+.2f}"
        lines.append(f"{r['method']:<14} {r['acc_mean']:>14.2f} +- {r['acc_std']:<5.2f} {delta:>14} "
                     f"{r['train_s']:>10.1f}s")
    return "\n".join(lines)


def write_json(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
