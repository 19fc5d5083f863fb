"""Streaming data throughput: featkd's streaming loader against the same pipeline written by hand.

For each pipeline (``PIPELINES``; today ``imagefolder``, ImageNet-size JPEGs generated once into ``--work``):

* throughput: featkd's training loader (``featkd.data.streaming``: per-sample seeded transforms in DataLoader
  workers, uint8 batches normalised in the main process) and the hand-written torchvision loader of the reference
  scripts (``ImageFolder`` + RandomResizedCrop / flip / ToTensor / Normalize in the workers, ``DataLoader``
  shuffled, same batch, workers, persistent workers and torch threads), one epoch of ``--images`` images each per
  round, in interleaved rounds (the order alternates); images/s, wall and CPU time (this process and its
  workers, from /proc) per round, the median of the rounds, and ``ratio_images_per_s`` = featkd / hand-written
  round by round (median and spread);
* memory: peak resident memory of a fresh child process that builds each loader over ``--memory-sizes`` images
  and reads ``--memory-batches`` batches: the main process's VmHWM and the largest worker's maxrss;
* first step: ``featkd train`` (a tiny config: resnet8 at 64 px, 1 epoch, ``train.checkpoint_every_steps 1``)
  at ``--first-step-sizes`` images, in interleaved repeats: seconds from the process start to its first output
  line (the data set's description, printed once everything is built) and to the first training step (the
  checkpoint written after it appears); the run is then stopped with SIGTERM.

Writes ``--out`` (JSON, with the environment) and prints a markdown summary::

    PYTHONPATH=. python benchmarks/data_throughput.py [--images N] [--workers W] [--threads T] [--rounds R]
        [--batch B] [--memory-sizes 200 1000 2000] [--first-step-sizes 200 2000] [--pipelines imagefolder]

Another pipeline (COCO, Cityscapes) is one more :class:`Pipeline` in ``PIPELINES``: a generator of N samples,
the featkd ``data:`` section over them and the hand-written loader.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- pipelines ----------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """One data pipeline measured both ways.

    ``generate(root, n)``: write ``n`` training samples (and a few evaluation ones) under ``root``;
    ``data(root, args)``: featkd's ``data:`` section reading them; ``reference(root, args)``: the hand-written
    loader (an iterable of ``(x, y)`` batches, re-iterable, reshuffled per pass); ``count(x)``: images in a batch;
    ``first_step``: the rest of the ``featkd train`` config for the first-step timing (student, method, data keys).
    """

    name: str
    generate: Callable[[Path, int], None]
    data: Callable[[Path, argparse.Namespace], dict[str, Any]]
    reference: Callable[[Path, argparse.Namespace], Iterable[Any]]
    first_step: dict[str, Any]
    count: Callable[[Any], int] = len


IMAGEFOLDER_CLASSES = 4


def generate_imagefolder(root: Path, n: int) -> None:
    """``n`` 500x375 JPEGs (ImageNet's typical size; quality 75, smooth content plus noise: about 40 KB each) in
    ``root/train/c<k>/``, one per class in ``root/val/``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", IMAGEFOLDER_CLASSES)):
        for i in range(count):
            folder = root / split / f"c{i % IMAGEFOLDER_CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            low = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((500, 375),
                                                                                            Image.BICUBIC)
            pixels = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3), dtype=np.int16)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=75)


def imagefolder_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {"dataset": "imagefolder", "data_dir": str(root), "image_size": args.image_size,
            "num_workers": args.workers}


def imagefolder_reference(root: Path, args: argparse.Namespace) -> Iterable[Any]:
    """torchvision's reference classification pipeline (ClassificationPresetTrain without auto-augment)."""
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                       num_workers=args.workers, persistent_workers=args.workers > 0,
                                       pin_memory=torch.device(args.device).type == "cuda")


PIPELINES: dict[str, Pipeline] = {
    "imagefolder": Pipeline(
        "imagefolder", generate_imagefolder, imagefolder_data, imagefolder_reference,
        first_step={"data": {"image_size": 64, "batch_size": 16, "eval_batch_size": 64},
                    "student": {"model": "resnet8"}, "method": {"name": "none"}},
    ),
}


# ---- data on disk, made once ----------------------------------------------------------------------------------


def dataset_root(pipe: Pipeline, work: Path, n: int, largest: int) -> Path:
    """The folder of ``n`` samples: the ``largest`` set is generated once (kept in ``work`` for later runs), the
    smaller ones are hard links to its first files."""
    full = work / pipe.name / f"n{largest}"
    if not (full / "DONE").is_file():
        t0 = time.perf_counter()
        pipe.generate(full, largest)
        (full / "DONE").write_text(f"{largest}\n")
        print(f"{pipe.name}: generated {largest} samples in {time.perf_counter() - t0:.1f} s", flush=True)
    if n == largest:
        return full
    root = work / pipe.name / f"n{n}"
    if not (root / "DONE").is_file():
        train = sorted(p for p in (full / "train").rglob("*") if p.is_file())
        keep = sorted(train, key=lambda p: p.name)[:n]
        for path in [*keep, *(p for p in (full / "val").rglob("*") if p.is_file())]:
            target = root / path.relative_to(full)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(path, target)
        (root / "DONE").write_text(f"{n}\n")
    return root


# ---- measurements -------------------------------------------------------------------------------------------


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live child processes (the DataLoader workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if fields[1] == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def featkd_loader(pipe: Pipeline, root: Path, args: argparse.Namespace) -> Any:
    from featkd.config import from_dict
    from featkd.data import DataConfig, build_data

    cfg = from_dict(DataConfig, pipe.data(root, args), "data")
    return build_data(cfg).train_loader(args.batch, seed=0, device=args.device)


def touch(x: Any) -> None:
    """Read one value per 4 KiB page of a batch's tensors, as a model would read them all: a hand-written loader's
    batches arrive in shared memory that costs page faults (and counts as resident) only once read."""
    for t in x if isinstance(x, (list, tuple)) else [x]:
        if isinstance(t, torch.Tensor) and t.numel():
            t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum().item()


def one_epoch(loader: Iterable[Any], pipe: Pipeline, device: str) -> int:
    """Images of one pass over ``loader`` (every batch on ``device``, read by :func:`touch`)."""
    images = 0
    for x, _y in loader:
        x = x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
        touch(x)
        images += pipe.count(x)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return images


def throughput(pipe: Pipeline, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """featkd vs hand-written, one epoch each per round, interleaved."""
    loaders = {"featkd": featkd_loader(pipe, root, args), "hand_written": pipe.reference(root, args)}
    epoch = {"featkd": 0}

    def run(name: str) -> tuple[int, float, float]:
        if name == "featkd":
            loaders[name].set_epoch(epoch["featkd"])
            epoch["featkd"] += 1
        cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
        images = one_epoch(loaders[name], pipe, args.device)
        return images, time.perf_counter() - t0, tree_cpu_seconds() - cpu0

    for name in loaders:  # warm-up: workers started, files in the page cache
        run(name)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in loaders}
    for r in range(args.rounds):
        for name in (list(loaders) if r % 2 == 0 else list(loaders)[::-1]):
            images, wall, cpu = run(name)
            rows[name].append({"images": images, "wall_s": wall, "cpu_s": cpu, "images_per_s": images / wall,
                               "cpu_ms_per_image": 1000 * cpu / images})
            print(f"  round {r + 1}/{args.rounds} {name:12s} {images / wall:7.1f} images/s  "
                  f"cpu {1000 * cpu / images:5.2f} ms/image", flush=True)
    per_round = sorted(a["images_per_s"] / b["images_per_s"]
                       for a, b in zip(rows["featkd"], rows["hand_written"], strict=True))
    out: dict[str, Any] = {"images": len(rows["featkd"]) and rows["featkd"][0]["images"], "rounds": args.rounds}
    for name, rs in rows.items():
        out[name] = {"images_per_s_median": statistics.median(r["images_per_s"] for r in rs),
                     "cpu_ms_per_image_median": statistics.median(r["cpu_ms_per_image"] for r in rs),
                     "per_round": rs}
    # the paired estimate (each round's two epochs ran side by side, so drift of the machine cancels) and the
    # ratio of the two medians
    out["ratio_images_per_s"] = {"median": statistics.median(per_round), "min": per_round[0],
                                 "max": per_round[-1], "per_round_sorted": per_round,
                                 "of_medians": out["featkd"]["images_per_s_median"]
                                 / out["hand_written"]["images_per_s_median"]}
    out["ratio_cpu_per_image"] = statistics.median(
        a["cpu_ms_per_image"] / b["cpu_ms_per_image"] for a, b in zip(rows["featkd"], rows["hand_written"],
                                                                      strict=True))
    return out


def vm(key: str) -> float:
    """``/proc/self/status`` field ``key`` (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: build one loader over ``args.root``, read ``args.memory_batches`` batches, print the
    peak resident memory (JSON)."""
    pipe = PIPELINES[args.pipeline]
    root = Path(args.root)
    loader = featkd_loader(pipe, root, args) if args.loader == "featkd" else pipe.reference(root, args)
    built = vm("VmRSS")
    images = 0
    for b, (x, _y) in enumerate(loader):
        touch(x)
        images += pipe.count(x)
        if b + 1 == args.memory_batches:
            break
    main_peak = vm("VmHWM")
    del loader, x, _y
    gc.collect()  # the DataLoader iterator goes: its workers are joined, so RUSAGE_CHILDREN counts them
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if args.workers else 0.0
    print(json.dumps({"images_read": images, "rss_after_build_mib": built, "peak_main_mib": main_peak,
                      "peak_worker_mib": workers}))


def memory(pipe: Pipeline, roots: dict[int, Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n, root in roots.items():
        for loader in ("featkd", "hand_written"):
            cmd = [sys.executable, __file__, "--child-memory", "--pipeline", pipe.name, "--root", str(root),
                   "--loader", loader, "--workers", str(args.workers), "--batch", str(args.batch),
                   "--image-size", str(args.image_size), "--memory-batches", str(args.memory_batches)]
            proc = subprocess.run(cmd, cwd=ROOT, env=child_env(args), capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            row = {"images": n, "loader": loader, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"  {n:6d} images {loader:12s} peak main {row['peak_main_mib']:7.1f} MiB  "
                  f"largest worker {row['peak_worker_mib']:7.1f} MiB", flush=True)
    return rows


def child_env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}


def first_step_once(pipe: Pipeline, root: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """One ``featkd train`` process: seconds to its first output line and to its first training step."""
    cfg = {"name": "first-step", **pipe.first_step,
           "data": {**pipe.data(root, args), **pipe.first_step.get("data", {})},
           "train": {"epochs": 1, "num_threads": args.threads, "progress": "off", "tensorboard": False,
                     "checkpoint_every_steps": 1, "device": args.device}}
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "first-step.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "featkd", "train", str(config), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first_line: dict[str, float] = {}
    err: list[str] = []

    def read_out() -> None:
        for _line in proc.stdout:
            first_line.setdefault("t", time.perf_counter() - t0)

    readers = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    step = None
    while proc.poll() is None:
        if (out / "last.pt").exists():
            step = time.perf_counter() - t0
            break
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # stops after the step in progress (exit 143)
    proc.wait(timeout=300)
    for reader in readers:
        reader.join(timeout=10)
    if step is None or "t" not in first_line:
        raise SystemExit(f"{' '.join(cmd)} ended ({proc.returncode}) before its first step:\n{''.join(err)[-3000:]}")
    return {"first_line_s": first_line["t"], "first_step_s": step}


def first_step(pipe: Pipeline, roots: dict[int, Path], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in roots}
    for r in range(args.first_step_repeats):
        for n in (list(roots) if r % 2 == 0 else list(roots)[::-1]):
            t = first_step_once(pipe, roots[n], work / f"first-step-{pipe.name}", args)
            runs[n].append(t)
            print(f"  {n:6d} images  first line {t['first_line_s']:5.2f} s  first step {t['first_step_s']:5.2f} s",
                  flush=True)
    return {str(n): {"first_line_s_median": statistics.median(t["first_line_s"] for t in ts),
                     "first_step_s_median": statistics.median(t["first_step_s"] for t in ts), "runs": ts}
            for n, ts in runs.items()}


# ---- report -------------------------------------------------------------------------------------------------


def summary(results: dict[str, Any]) -> str:
    lines = []
    for name, res in results["pipelines"].items():
        t = res["throughput"]
        ratio = t["ratio_images_per_s"]
        lines += [f"### {name}: throughput ({t['images']} images per round, {t['rounds']} rounds, "
                  f"{results['args']['workers']} workers, batch {results['args']['batch']}, "
                  f"{results['args']['image_size']} px)", "",
                  "| loader | images/s (median) | CPU ms/image (median) |", "|---|---|---|"]
        for loader in ("featkd", "hand_written"):
            lines.append(f"| {loader} | {t[loader]['images_per_s_median']:.1f} | "
                         f"{t[loader]['cpu_ms_per_image_median']:.2f} |")
        lines += ["", f"ratio_images_per_s (featkd / hand-written): per round, median {ratio['median']:.3f} "
                      f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}); of the medians {ratio['of_medians']:.3f}; "
                      f"CPU per image, per round median {t['ratio_cpu_per_image']:.3f}", "",
                  f"### {name}: peak resident memory (MiB) after {results['args']['memory_batches']} batches", "",
                  "| images | loader | main after build (VmRSS) | main peak (VmHWM) | largest worker |",
                  "|---|---|---|---|---|"]
        for row in res["memory"]:
            lines.append(f"| {row['images']} | {row['loader']} | {row['rss_after_build_mib']:.1f} | "
                         f"{row['peak_main_mib']:.1f} | {row['peak_worker_mib']:.1f} |")
        lines += ["", f"### {name}: `featkd train` start to first output line / first training step (median)", "",
                  "| images | first line (s) | first step (s) |", "|---|---|---|"]
        for n, row in res["first_step"].items():
            lines.append(f"| {n} | {row['first_line_s_median']:.2f} | {row['first_step_s_median']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="images per throughput round (one epoch)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loaders")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (both loaders)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="where the batches go (cpu, cuda)")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--memory-batches", type=int, default=8)
    parser.add_argument("--first-step-sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--first-step-repeats", type=int, default=3)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "data_throughput",
                        help="generated data and scratch runs (kept: the data is reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_throughput.json")
    # a memory measurement's child process
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--loader", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        memory_child(args)
        return

    from featkd.bench.timing import environment

    results: dict[str, Any] = {"benchmark": "data_throughput", "environment": environment(),
                               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                        if k not in ("child_memory", "pipeline", "root", "loader")},
                               "command": " ".join(["python", "benchmarks/data_throughput.py", *sys.argv[1:]]),
                               "pipelines": {}}
    for name in args.pipelines:
        pipe = PIPELINES[name]
        largest = max(args.images, *args.memory_sizes, *args.first_step_sizes)
        roots = {n: dataset_root(pipe, args.work, n, largest)
                 for n in sorted({args.images, *args.memory_sizes, *args.first_step_sizes})}
        print(f"{name}: throughput, {args.images} images per round", flush=True)
        res = {"throughput": throughput(pipe, roots[args.images], args)}
        print(f"{name}: peak resident memory", flush=True)
        res["memory"] = memory(pipe, {n: roots[n] for n in args.memory_sizes}, args)
        print(f"{name}: time to the first step", flush=True)
        res["first_step"] = first_step(pipe, {n: roots[n] for n in args.first_step_sizes}, args.work, args)
        results["pipelines"][name] = res
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(summary(results))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
