"""Does the KDA loss scale linearly in N where a full-kernel loss scales quadratically?  (issue 6)

Part 1, the loss alone. For N examples (teacher and student features of width d, random), m landmarks:

* ``kda``: the partial matrices ``K_nm`` (N x m) of both networks and KDA's loss (normalized form),
  forward + backward to the student features;
* ``full``: the same loss on the full N x N kernel matrices, forward + backward.

Each (loss, N, d) runs in a fresh subprocess with one thread: seconds per call (median of interleaved-round
timing, :mod:`featkd.bench.timing`) and the peak extra resident memory of one forward + backward (Linux
``VmHWM`` reset through ``/proc/self/clear_refs`` after the inputs exist and one warm-up call; on CUDA
``torch.cuda.max_memory_allocated``). The exponent b of ``time ~ N^b`` and ``memory ~ N^b`` is fitted by
least squares on log-log over the measured N.

The full loss is *not run* where it would not fit: its peak is estimated as ``FULL_MATRICES`` N x N float32
matrices (the constant is checked against the measured peaks at the N that do run, and reported) and an N
whose estimate exceeds ``--full-budget-gib`` (default 3 GiB: this benchmark machine has 24 GiB shared by
five people) is reported as ``{"status": "oom", "estimated_bytes": ...}`` instead of exhausting the RAM.

Part 2, ``--step-ratio``: one KDA training step (term on) against one Hinton KD step of the same teacher,
student and batch, timed side by side through real :class:`~featkd.engine.trainer.Trainer` steps
(:func:`featkd.bench.timing.trainer_step`), with SP and RKD for comparison. Target: KDA / KD <= 1.05.

    python benchmarks/kda_scaling.py [--n 1000 5000 10000 50000] [--widths 64 512] [--step-ratio]
           [--out benchmarks/results/kda_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: N x N float32 matrices alive at the peak of the full loss's forward + backward (K_s, K_t, the elementwise
#: smooth-L1 / its gradient, the gradient of K_s): the estimate behind the out-of-memory refusal; the
#: measured peaks are reported next to it as "matrices_measured"
FULL_MATRICES = 4
STEP_TARGET = 1.05  # issue 6: KDA step / Hinton KD step
STEP_CONFIGS = {  # label -> config; the step ratio is measured on these (digits: always available)
    "kd": "configs/{ds}-kd-resnet20-resnet8.yaml",
    "kda": "configs/{ds}-kda-resnet20-resnet8.yaml",
    "kda-official": "configs/{ds}-kda-official-resnet20-resnet8.yaml",
    "sp": "configs/{ds}-sp-resnet20-resnet8.yaml",
    "rkd": "configs/{ds}-rkd-resnet20-resnet8.yaml",
}


# ---- worker: one (loss, N, d) measurement in this process ------------------------------------------------
def _rss_kib(field: str) -> int:
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def worker(loss: str, n: int, d: int, m: int, device: str, rounds: int) -> dict:
    import torch

    from featkd.bench.timing import time_interleaved
    from featkd.methods.kda.distiller import kda_loss

    torch.set_num_threads(1)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, d, generator=g).to(dev)
    s = torch.randn(n, d, generator=g).to(dev).requires_grad_(True)
    c_t, c_s = torch.randn(m, d, generator=g).to(dev), torch.randn(m, d, generator=g).to(dev)

    def step() -> None:
        if loss == "kda":
            k_s = s @ c_s.T
            with torch.no_grad():
                k_t = t @ c_t.T
        else:
            k_s = s @ s.T
            with torch.no_grad():
                k_t = t @ t.T
        kda_loss(k_s, k_t, "normalized").backward()
        s.grad = None

    step()  # first call: lazy allocations of autograd / BLAS, not part of the loss's own footprint
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        step()
        peak = (_rss_kib("VmHWM") - base) * 1024
    # calls per round: enough for ~0.2 s, so tiny N is not all timer noise
    t0 = time.perf_counter()
    step()
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, min(1000, int(0.2 / once)))
    times = time_interleaved({"step": step}, rounds=rounds, calls=calls, warmup=1, device=dev)["step"]
    return {"status": "ok", "seconds": times["median"], "seconds_min": times["min"], "calls": calls,
            "rounds": rounds, "peak_bytes": int(peak)}


# ---- driver ---------------------------------------------------------------------------------------------
def fit_exponent(ns: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(N)."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def measure(loss: str, n: int, d: int, m: int, device: str, rounds: int, budget: float) -> dict:
    if loss == "full":
        estimate = FULL_MATRICES * n * n * 4
        if estimate > budget:
            return {"status": "oom", "estimated_bytes": estimate,
                    "reason": f"estimated {estimate / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB; not run"}
    cmd = [sys.executable, __file__, "--worker", loss, str(n), str(d), str(m), "--device", device,
           "--rounds", str(rounds)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137)
        return {"status": "oom" if killed else "error", "returncode": proc.returncode,
                "stderr": proc.stderr[-500:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if loss == "full":
        result["matrices_measured"] = result["peak_bytes"] / (n * n * 4)
    return result


def scaling(args: argparse.Namespace) -> dict:
    budget = args.full_budget_gib * 2**30
    rows = []
    for d in args.widths:
        for n in args.n:
            for loss in ("kda", "full"):
                r = measure(loss, n, d, args.landmarks, args.device, args.rounds, budget)
                rows.append({"loss": loss, "n": n, "width": d, "m": args.landmarks, **r})
                shown = (f"{r['seconds'] * 1e3:9.3f} ms  {r['peak_bytes'] / 2**20:9.1f} MiB"
                         if r["status"] == "ok" else r["status"])
                print(f"{loss:5s} N={n:6d} d={d:4d}: {shown}", flush=True)
    fits = []
    for d in args.widths:
        for loss in ("kda", "full"):
            ok = [r for r in rows if r["loss"] == loss and r["width"] == d and r["status"] == "ok"]
            ns = [r["n"] for r in ok]
            fits.append({"loss": loss, "width": d, "n_fitted": ns,
                         "time_exponent": fit_exponent(ns, [r["seconds"] for r in ok]),
                         "memory_exponent": fit_exponent(ns, [r["peak_bytes"] for r in ok])})
    return {"rows": rows, "fits": fits, "full_matrices_estimate": FULL_MATRICES,
            "full_budget_bytes": int(budget)}


def step_ratio(args: argparse.Namespace) -> dict:
    import torch

    from featkd.bench.timing import ratios, time_interleaved, trainer_step
    from featkd.config import apply_overrides, build_config, load_raw
    from featkd.engine.trainer import Trainer
    from featkd.models.zoo import resolve_weights

    torch.set_num_threads(1)
    out = {}
    for ds in args.step_datasets:
        overrides = ["train.num_threads=1", "train.progress=off", "train.tensorboard=false",
                     f"train.device={args.device}"]
        trainers, notes = {}, []
        for label, pattern in STEP_CONFIGS.items():
            path = ROOT / pattern.format(ds=ds)
            if not path.is_file():
                continue
            raw = apply_overrides(load_raw(path), overrides)
            try:
                resolve_weights(raw["teacher"]["checkpoint"])
            except Exception:  # the timing does not depend on the weights: time an untrained teacher
                raw["teacher"]["checkpoint"] = None
                notes.append(f"{label}: untrained teacher (zoo entry missing)")
            if raw["method"]["name"] == "kda":
                raw["method"]["warmup_epochs"] = 0  # the term on from the first step
            trainer = Trainer(build_config(raw), None, log=lambda _m: None)
            ctx = trainer.context()
            trainer.distiller.setup(ctx)
            trainer.distiller.on_epoch_start(0, ctx)  # KDA: the centres (eval pass) before timing
            trainers[label] = trainer
        times = time_interleaved({k: trainer_step(t) for k, t in trainers.items()}, rounds=args.step_rounds,
                                 calls=args.step_calls, device=args.device)
        r = ratios(times, "kd")
        batch = trainers["kd"].cfg.data.batch_size
        out[ds] = {"batch_size": batch, "seconds_per_step": {k: v["median"] for k, v in times.items()},
                   "ratio_to_kd": r, "target": STEP_TARGET,
                   "kda_within_target": r.get("kda", math.inf) <= STEP_TARGET, "notes": notes}
        print(f"{ds} (batch {batch}): " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 5000, 10000, 50000])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--landmarks", type=int, default=100, help="m (default 100: the official CIFAR-100 m)")
    parser.add_argument("--full-budget-gib", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-scaling", action="store_true", help="skip part 1")
    parser.add_argument("--step-ratio", action="store_true", help="also run part 2")
    parser.add_argument("--step-datasets", nargs="+", default=["digits", "fashion-mnist"])
    parser.add_argument("--step-rounds", type=int, default=7)
    parser.add_argument("--step-calls", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/kda_scaling.json")
    parser.add_argument("--worker", nargs=4, metavar=("LOSS", "N", "D", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        loss, n, d, m = args.worker[0], *map(int, args.worker[1:])
        print(json.dumps(worker(loss, n, d, m, args.device, args.rounds)))
        return

    from featkd.bench.timing import environment

    result = {"benchmark": "kda_scaling", "environment": environment(), "device": args.device,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if not args.no_scaling:
        result["scaling"] = scaling(args)
    if args.step_ratio:
        result["step_ratio"] = step_ratio(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
