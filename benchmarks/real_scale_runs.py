"""Three short CPU ``featkd train`` runs on data of real scale, streamed from disk, through the command line.

Data, generated into ``--work`` (kept and reused) by the generators of ``data_throughput.py``:

* a COCO-size folder in COCO's layout: ``--coco-train`` + ``--coco-val`` JPEGs (default 48 + 16) of COCO's typical
  sizes (480-640 x 360-480), 1-5 objects each of three non-contiguous category ids (3, 18, 44), instance masks
  as polygons and (every 5th annotation) uncompressed RLE;
* a Cityscapes-layout folder: ``--cityscapes-train`` + ``--cityscapes-val`` (default 6 + 2) PNG pairs at
  2048 x 1024 (``leftImg8bit`` + ``gtFine`` label ids, mapped to the 19 train ids by featkd).

Runs (1 epoch each, AdamW 1e-3, seed 0, ``--threads`` torch threads, ``--workers`` DataLoader workers):

* ``detection``: ``retinanet_resnet8``, method none, ``data.resize_short`` [320, 352, 384] (evaluation: 384),
  ``data.resize_max`` 640, flip; COCO box AP on the validation images at their original coordinates;
* ``instance``: ``maskrcnn_resnet8`` with ``data.masks: true``, the same resize; box and mask AP;
* ``segmentation``: ``fcn_resnet8`` on the Cityscapes layout: crops of 256 x 512 from a random rescale
  [0.5, 2.0] of 1024 x 2048 (mmseg's recipe at a smaller crop), flip; mIoU at the full 2048 x 1024 resolution,
  predicted in 1024 x 1024 windows (``data.eval_window``), evaluation batch 1.

Per run it records the command, the run's first line (the data description with its storage phrase), the
final metrics (the last ``metrics.jsonl`` record's ``test_*`` values), the wall time of the process, and its peak
memory: ``peak_rss_mib`` = the largest peak resident set of one process of the run (the main process or a
DataLoader worker; ``wait4``'s ``ru_maxrss``, exact) and ``peak_tree_pss_mib`` = the largest sum of the
proportional set sizes of the main process and its workers (pages shared between them counted once in all),
sampled every 0.25 s.
Writes ``--out`` (JSON) and prints a markdown table. About 4 minutes on 2 cores (generation: 6 s)::

    PYTHONPATH=. python benchmarks/real_scale_runs.py [--runs detection instance segmentation] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from data_throughput import MMSEG_CITYSCAPES, write_cityscapes, write_coco  # benchmarks/ (this folder) is on sys.path

ROOT = Path(__file__).resolve().parents[1]
COCO_RESIZE = {"resize_short": [320, 352, 384], "resize_max": 640}


def coco_config(root: Path, args: argparse.Namespace, *, student: str, masks: bool) -> dict[str, Any]:
    return {"data": {"dataset": "coco", "data_dir": str(root), "masks": masks, **COCO_RESIZE,
                     "batch_size": 4, "eval_batch_size": 2, "num_workers": args.workers},
            "student": {"model": student}, "method": {"name": "none"}}


def cityscapes_config(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {"data": {"dataset": "cityscapes", "data_dir": str(root), **MMSEG_CITYSCAPES, "crop_size": [256, 512],
                     "eval_window": [1024, 1024], "batch_size": 2, "eval_batch_size": 1, "num_workers": args.workers},
            "student": {"model": "fcn_resnet8"}, "method": {"name": "none"}}


RUNS = {
    "detection": ("coco", lambda root, args: coco_config(root, args, student="retinanet_resnet8", masks=False)),
    "instance": ("coco", lambda root, args: coco_config(root, args, student="maskrcnn_resnet8", masks=True)),
    "segmentation": ("cityscapes", cityscapes_config),
}


def make_data(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The two folders (generated once; a folder's ``DONE`` names its sizes, and other sizes regenerate it)."""
    folders = {
        "coco": (work / "coco", {"train2017": args.coco_train, "val2017": args.coco_val},
                 lambda root, splits: write_coco(root, splits, seed=0, rle_every=5)),
        "cityscapes": (work / "cityscapes", {"train": args.cityscapes_train, "val": args.cityscapes_val},
                       lambda root, splits: write_cityscapes(root, splits, seed=0)),
    }
    roots = {}
    for name, (root, splits, write) in folders.items():
        done = root / "DONE"
        if not done.is_file() or json.loads(done.read_text()) != splits:
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.perf_counter()
            write(root, splits)
            done.write_text(json.dumps(splits))
            print(f"{name}: generated {splits} in {time.perf_counter() - t0:.1f} s", flush=True)
        roots[name] = root
    return roots


def tree_pss_mib(pid: int) -> float:
    """Proportional set size of ``pid`` and its child processes (MiB; /proc/<pid>/smaps_rollup): a page shared by
    k of them counts 1/k in each, so the sum is the memory the run holds (a sum of resident sets would count the
    pages a forked DataLoader worker shares with the main process once per worker)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.parent.name != str(pid) and stat.read_text().rsplit(")", 1)[1].split()[1] != str(pid):
                continue
            rollup = (stat.parent / "smaps_rollup").read_text().splitlines()
        except (OSError, IndexError):  # exited meanwhile
            continue
        total += sum(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    return total / 1024


def shown(path: Path) -> str:
    """``path`` relative to the repository when under it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def train(name: str, cfg: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``featkd train`` process: its first line, final metrics, wall time and peak memory."""
    cfg = {"name": f"real-scale-{name}", **cfg, "optim": {"optimizer": "adamw", "lr": 1e-3},
           "train": {"epochs": 1, "num_threads": args.threads, "progress": "off", "tensorboard": False, "seed": 0,
                     "device": "cpu"}}
    config, out = work / f"{name}.yaml", work / "runs" / name
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "featkd", "train", str(config), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    peak_tree = [0.0]  # MiB, PSS
    finished = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(f"  | {line.rstrip()}", flush=True)

    def sample() -> None:
        while not finished.wait(0.25):
            peak_tree[0] = max(peak_tree[0], tree_pss_mib(proc.pid))

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=sample, daemon=True)]
    for thread in threads:
        thread.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this run alone (its workers included)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    finished.set()
    for thread in threads:
        thread.join(timeout=10)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(lines[-40:]))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    return {
        "command": " ".join(["python", "-m", "featkd", "train", shown(config), "--out", shown(out)]),
        "config": cfg,
        "first_line": lines[0] if lines else "",
        "metrics": {k: v for k, v in record.items() if k.startswith("test_")},
        "metric": summary.get("metric"),
        "status": summary.get("status"),
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "peak_tree_pss_mib": peak_tree[0],
        "last_lines": lines[-3:],
    }


def table(results: dict[str, Any]) -> str:
    rows = ["| run | student | data | box AP | mask AP | mIoU | wall (s) | peak RSS, largest process (MiB) | "
            "peak PSS, process + workers (MiB) |", "|---|---|---|---|---|---|---|---|---|"]

    def num(value: Any) -> str:
        return "" if value is None else f"{value:.2f}"

    for name, run in results["runs"].items():
        m, data = run["metrics"], run["config"]["data"]
        rows.append(f"| {name} | {run['config']['student']['model']} | {data['dataset']} | {num(m.get('test_ap'))} | "
                    f"{num(m.get('test_mask_ap'))} | {num(m.get('test_miou'))} | {run['wall_s']:.0f} | "
                    f"{run['peak_rss_mib']:.0f} | {run['peak_tree_pss_mib']:.0f} |")
    rows += ["", "First lines:", ""] + [f"- {name}: `{run['first_line']}`" for name, run in results["runs"].items()]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--coco-train", type=int, default=48)
    parser.add_argument("--coco-val", type=int, default=16)
    parser.add_argument("--cityscapes-train", type=int, default=6)
    parser.add_argument("--cityscapes-val", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--threads", type=int, default=2, help="train.num_threads")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "real_scale",
                        help="generated data (kept), configs and run folders")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_scale_runs.json")
    args = parser.parse_args()

    from featkd.bench.timing import environment

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    roots = make_data(args.work, args)
    results: dict[str, Any] = {
        "benchmark": "real_scale_runs", "environment": environment(),
        "command": " ".join(["python", "benchmarks/real_scale_runs.py", *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"coco": {"train": args.coco_train, "val": args.coco_val, "sizes": "480-640 x 360-480 JPEG",
                          "objects": "1-5 per image, category ids 3/18/44, polygons + RLE (every 5th)"},
                 "cityscapes": {"train": args.cityscapes_train, "val": args.cityscapes_val,
                                "sizes": "2048 x 1024 PNG, gtFine labelIds"}},
        "runs": {},
    }
    for name in args.runs:
        kind, make = RUNS[name]
        print(f"{name}: featkd train on {kind}", flush=True)
        results["runs"][name] = train(name, make(roots[kind], args), args.work, args)
    results["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(f"written to {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
