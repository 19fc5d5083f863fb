"""The GPU path in one command: every method with bf16, torchrun + SyncBatchNorm + resume, images/s.  (issue 11)

On the first CUDA device it finds (at most ~8 minutes on one GPU) this script

1. trains every method for one short epoch on Fashion-MNIST with bf16 autocast (``train.amp: bf16``), with the
   options of its config (``configs/fashion-mnist-<method>-resnet20-resnet8[-w8].yaml`` and its ``base:``;
   dense / segmentation configs ``configs/scenes-seg-*.yaml`` join when they exist) and checks: loss finite,
   test accuracy above chance, ``last.pt`` / ``student.pt`` written and reloadable on the CPU (a fresh CPU
   model loads ``student.pt`` strictly and is evaluated on the first test images);
2. runs ``torchrun -m featkd train`` (nccl on CUDA, gloo on CPU; world size = the number of GPUs) with
   ``train.sync_batchnorm: true`` for one epoch, then ``--resume`` to two epochs (with one GPU the world size
   is 1: still a real nccl process group, DDP and SyncBatchNorm modules; cross-GPU reduction needs two GPUs);
3. times featkd's Hinton-KD step (``Trainer.train_step``) against a hand-written PyTorch KD loop
   (``benchmarks/step_overhead.py``'s, with the same autocast / channels-last / compile options added by
   hand) on a CIFAR-style ResNet pair at 32 px and ``torchvision:resnet50 -> resnet18`` at 224 px: fp32 and
   bf16, channels-last off / on, ``torch.compile`` off / on (``train.channels_last`` / ``train.compile``), and
   the hand loop's teacher under ``torch.inference_mode`` vs ``no_grad``; interleaved rounds, medians, ratios;
   and a full-size detection pair: torchvision's RetinaNet R50-FPN -> R18-FPN (featkd's ``retinanet_resnet18_fpn``) at
   512 px with bf16 autocast, no pretrained weights, FitNets on every FPN level, featkd's step against
   torchvision's training loop written by hand (``step_overhead.hand_written_detection_step``), on scenes-det
   canvases (128 px, resized to 512 when decoded);
4. writes one JSON file (environment, every sub-check's pass/fail and error) and prints a short table. One
   failing sub-check does not stop the others; the exit status is 1 if any failed.

Without CUDA it runs the same code paths on the CPU with tiny sizes in under a minute (``tests/test_gpu_check.py``;
the detection pair at 128 px, 2 images);
dense families (``scenes-seg-*``, ~10-30 s a config on one core) are skipped there unless ``--dense-limit N``.

The GPU machines hold only the tracked files (plus carried files), reach no network and have no featkd install
or Fashion-MNIST. Two steps:

    # here (Fashion-MNIST installed): a 12k-train / 2k-test subset, about 6 MB, git-ignored
    PYTHONPATH=. python3 benchmarks/gpu_check.py --make-data data/fashion-mnist-small.npz
    # there, from the repository root, with carry ["data/fashion-mnist-small.npz"]:
    PYTHONPATH=. python3 benchmarks/gpu_check.py --data data/fashion-mnist-small.npz

(``make gpu-check`` does the second step, adding ``--data`` when the .npz exists.) The .npz is written out as
IDX files into a temporary folder that ``data.data_dir`` points at, so featkd's own loader reads it.
Default output: ``benchmarks/results/gpu_check.json`` on CUDA, ``runs/gpu_check/gpu_check-cpu.json`` on CPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import pickle
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from step_overhead import hand_written_detection_step, hand_written_step  # benchmarks/ (this folder) is on sys.path
from torch import Tensor

from featkd.bench.timing import environment, step_on, time_interleaved
from featkd.config import build_config, load_config
from featkd.data import read_idx, write_idx
from featkd.engine.trainer import Trainer
from featkd.methods import METHODS
from featkd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
KD_CONFIG = CONFIGS / "fashion-mnist-kd-resnet20-resnet8.yaml"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
DEFAULT_OUT = {"cuda": "benchmarks/results/gpu_check.json", "cpu": "runs/gpu_check/gpu_check-cpu.json"}
#: config families whose methods are checked: (glob, preferred file names in order; None = any name, shortest first)
FAMILIES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("fashion-mnist-*.yaml", ("fashion-mnist-{label}-resnet20-resnet8.yaml",
                              "fashion-mnist-{label}-resnet20-resnet8-w8.yaml", "fashion-mnist-{label}-resnet8.yaml")),
    ("scenes-seg-*.yaml", None),
)
#: method options whose value names a variant with its own check (MGD's reducers: mgd-amp, mgd-rd, mgd-sm)
VARIANT_KEYS = ("reducer",)
#: the detection pair: torchvision's RetinaNet R50-FPN, and the same on R18 (featkd.models.tv_detection)
DET_TEACHER, DET_STUDENT = "torchvision:retinanet_resnet50_fpn", "retinanet_resnet18_fpn"
DET_CANVAS = 128  # scenes' largest canvas; data.image_size resizes it to the pair's size when decoded


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair for the throughput section, at one input size and batch."""

    name: str
    teacher: str
    student: str
    image_size: int
    batch: int


@dataclass(frozen=True)
class Sizes:
    """How big each check is: the GPU sizes, or tiny ones on the CPU."""

    train_pool: int  # training images written for featkd's loader (the configs' train_subset picks from it)
    test: int  # test images
    train_subset: int | None  # method runs: None = the config's own (2,000 in the data-limited protocol)
    batch_size: int | None  # method runs: None = the config's own
    scenes: tuple[int, int] | None  # generated train / test canvases of `scenes` configs: None = the config's own
    dense_limit: int | None  # configs run per dense family (scenes-seg-*: ~30 s each on 1 CPU core): None = all
    ddp_nproc: int
    pairs: tuple[Pair, ...]
    det_pairs: tuple[Pair, ...]  # detection throughput: bf16 eager, FitNets on the FPN levels
    det_scenes: tuple[int, int]  # scenes-det canvases (128 px) generated for it: train / test
    rounds: int
    calls: int
    warmup: int
    compile: bool
    time_budget_s: float  # compile rows of the throughput table are skipped once this is spent
    compile_reserve_s: float  # a compile row starts only with this much budget left (then: 1.2 x the slowest)


GPU_SIZES = Sizes(
    train_pool=12000, test=2000, train_subset=None, batch_size=None, scenes=None, dense_limit=None, ddp_nproc=1,
    pairs=(Pair("resnet32x4-resnet8x4@32", "resnet32x4", "resnet8x4", 32, 256),
           Pair("tv-resnet50-resnet18@224", "torchvision:resnet50", "torchvision:resnet18", 224, 128)),
    det_pairs=(Pair("tv-retinanet-r50-r18@512", DET_TEACHER, DET_STUDENT, 512, 16),), det_scenes=(64, 8),
    rounds=5, calls=10, warmup=3, compile=True, time_budget_s=420.0, compile_reserve_s=100.0,
)
CPU_SIZES = Sizes(
    train_pool=600, test=200, train_subset=320, batch_size=8, scenes=(160, 50), dense_limit=0, ddp_nproc=2,
    pairs=(Pair("resnet56-resnet20@32", "resnet56", "resnet20", 32, 4),
           Pair("tv-resnet50-resnet18@64", "torchvision:resnet50", "torchvision:resnet18", 64, 2)),
    det_pairs=(Pair("tv-retinanet-r50-r18@128", DET_TEACHER, DET_STUDENT, 128, 2),), det_scenes=(4, 2),
    rounds=1, calls=1, warmup=1, compile=False, time_budget_s=50.0, compile_reserve_s=60.0,
)


# ---------------------------------------------------------------------------------------------------------
# data: the .npz the GPU machine receives, written back as IDX files for featkd's fashion-mnist loader
# ---------------------------------------------------------------------------------------------------------


def read_fashion_mnist(folder: Path) -> dict[str, np.ndarray]:
    """The four IDX arrays (gzip or raw) of an installed Fashion-MNIST folder."""
    arrays = {}
    for key, name in IDX_FILES.items():
        path = next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{folder / name}.gz not found (apt-get install dataset-fashion-mnist)")
        arrays[key] = read_idx(path)
    return arrays


def make_data(path: Path, source: Path, n_train: int = 12000, n_test: int = 2000) -> Path:
    """Write the first ``n_train`` / ``n_test`` Fashion-MNIST images and labels as one compressed .npz."""
    arrays = read_fashion_mnist(source)
    small = {k: v[: n_train if k.startswith("train") else n_test] for k, v in arrays.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **small)
    print(f"wrote {path}: {len(small['train_labels'])} train + {len(small['test_labels'])} test images, "
          f"{path.stat().st_size / 2**20:.1f} MiB")
    return path


def prepare_data(npz: Path | None, source: Path, sizes: Sizes, work: Path) -> dict[str, Any]:
    """IDX files for the method runs and torchvision CIFAR-10 pickles (3 x 32 x 32) for the throughput pairs."""
    if npz is not None:
        with np.load(npz) as z:
            arrays = {k: z[k] for k in IDX_FILES}
    else:
        arrays = read_fashion_mnist(source)
    arrays = {k: v[: sizes.train_pool if k.startswith("train") else sizes.test] for k, v in arrays.items()}
    fashion = work / "fashion-mnist"
    fashion.mkdir(parents=True)
    for key, name in IDX_FILES.items():
        write_idx(fashion / name, arrays[key])  # raw IDX: nothing to decompress
    # the same images, padded to 32 x 32 and repeated to 3 channels, in torchvision's CIFAR-10 format
    cifar = work / "cifar10"
    folder = cifar / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rgb = {split: np.repeat(np.pad(arrays[f"{split}_images"], ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1)
           for split in ("train", "test")}
    parts = np.array_split(np.arange(len(rgb["train"])), 5)
    for i, idx in enumerate(parts, 1):
        entry = {"data": rgb["train"][idx].reshape(len(idx), -1), "labels": arrays["train_labels"][idx].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry, protocol=2))
    entry = {"data": rgb["test"].reshape(len(rgb["test"]), -1), "labels": arrays["test_labels"].tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return {"ok": True, "source": str(npz or source), "train": len(arrays["train_labels"]),
            "test": len(arrays["test_labels"]), "fashion_dir": str(fashion), "cifar_dir": str(cifar)}


# ---------------------------------------------------------------------------------------------------------
# 1. every method, one short bf16 epoch
# ---------------------------------------------------------------------------------------------------------


def method_label(cfg: Any) -> str:
    """``kd``, ``fitnets``, ..., ``mgd-amp``: the method's name plus the values of its variant options."""
    parts = [cfg.method_name] + [str(cfg.method[k]) for k in VARIANT_KEYS if cfg.method.get(k) is not None]
    return "-".join(parts)


def discover_configs() -> tuple[dict[str, Path], list[str]]:
    """``{label: config}`` with one config per method variant, and the registered methods that have none.

    Fashion-MNIST: per label, the first file in the order of the preferred names whose config really is that
    label (so variants such as ``cwt-alpha10`` or ``mgd-amp-official`` are not picked). Other families: every
    file, grouped by label (prefixed by the family: ``scenes-seg:cwd``), the shortest name first. A candidate
    that does not load is kept under its file name, so that its check fails with the config error.
    """
    chosen: dict[str, Path] = {}
    methods: set[str] = set()
    for pattern, templates in FAMILIES:
        if templates is None:
            prefix = pattern.split("*")[0].rstrip("-") + ":"
            for path in sorted(CONFIGS.glob(pattern), key=lambda p: (len(p.name), p.name)):
                try:
                    cfg = load_config(path)
                except Exception:
                    chosen.setdefault(prefix + path.stem, path)
                    continue
                methods.add(cfg.method_name)
                chosen.setdefault(prefix + method_label(cfg), path)
            continue
        for template in templates:
            regex = re.escape(template).replace(re.escape("{label}"), "(?P<label>.+)")
            for path in sorted(CONFIGS.glob(template.format(label="*"))):
                match = re.fullmatch(regex, path.name)
                if match is None or match["label"] in chosen:
                    continue
                try:
                    cfg = load_config(path)
                except Exception:
                    chosen[match["label"]] = path
                    continue
                if method_label(cfg) == match["label"]:
                    chosen[match["label"]] = path
                    methods.add(cfg.method_name)
    return dict(sorted(chosen.items())), [m for m in METHODS.names() if m not in methods]


def run_overrides(cfg: Any, sizes: Sizes, data_dir: str, device: str) -> list[str]:
    """``--set`` overrides that make a config one short bf16 epoch on the prepared data."""
    sets = ["train.epochs=1", "train.stop_after=null", "train.eval_every=1", "train.amp=bf16",
            f"train.device={device}", "train.progress=off", "train.tensorboard=false"]
    subset = sizes.train_subset
    if cfg.data.dataset == "fashion-mnist":
        sets.append(f"data.data_dir={data_dir}")
    elif cfg.data.dataset == "scenes":  # canvases of the prepared Fashion-MNIST items, generated into the work folder
        sets.append(f"data.data_dir={Path(data_dir).parent / 'scenes'}")
        if cfg.data.scenes.source == "fashion-mnist":
            sets.append(f"data.scenes.source_dir={data_dir}")
        if sizes.scenes is not None:
            sets += [f"data.scenes.train_size={sizes.scenes[0]}", f"data.scenes.test_size={sizes.scenes[1]}"]
            subset = min(subset or sizes.scenes[0], sizes.scenes[0])
    if subset is not None:
        sets.append(f"data.train_subset={subset}")
    if sizes.batch_size is not None:
        sets.append(f"data.batch_size={sizes.batch_size}")
    if cfg.optim.warmup_epochs >= 1:  # the LR warm-up must be shorter than the one epoch
        sets.append("optim.warmup_epochs=0.5")
    if int(cfg.method.get("warmup_epochs") or 0) >= 1:  # a term that waits for later epochs: switch it on now
        sets.append("method.warmup_epochs=0")
    return sets


def evaluate_on_cpu(model: torch.nn.Module, trainer: Trainer, limit: int = 512, dense_limit: int = 16) -> float:
    """Accuracy in % of a CPU model on the first test images: ``limit`` of them, ``dense_limit`` for dense targets
    (per pixel, ignoring labels outside the classes), whose nets are slow on a CPU."""
    correct, total, images = 0, 0, 0
    model.eval()
    task = getattr(trainer, "task", None)
    with torch.no_grad():
        for x, y in trainer.data.test_loader(dense_limit, device="cpu"):
            out = model(x)
            logits = task.logits(out) if task is not None and hasattr(task, "logits") else out
            valid = (y >= 0) & (y < logits.shape[1])
            correct += int(((logits.argmax(1) == y) & valid).sum())
            total += int(valid.sum())
            images += len(y)
            if images >= (limit if y.dim() == 1 else dense_limit):
                break
    return 100.0 * correct / max(1, total)


def reload_on_cpu(trainer: Trainer, out: Path) -> dict[str, Any]:
    """Load ``last.pt`` and ``student.pt`` with map_location cpu into a fresh CPU model and evaluate it."""
    cfg = trainer.cfg
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    weights = torch.load(out / "student.pt", map_location="cpu", weights_only=True)
    same = set(last["student"]) == set(weights) and all(torch.equal(last["student"][k], v) for k, v in weights.items())
    model = create_model(cfg.student.model, num_classes=trainer.data.num_classes,
                         in_channels=trainer.data.input_shape[0], **cfg.student.options)
    model.load_state_dict(weights)  # strict: every key of the unmodified student
    threads = torch.get_num_threads()
    if trainer.device.type == "cuda":  # the GPU machine's CPU cores are otherwise idle
        torch.set_num_threads(os.cpu_count() or 1)
    try:
        acc = evaluate_on_cpu(model, trainer)
    finally:
        torch.set_num_threads(threads)
    return {"epoch": int(last["epoch"]), "last_equals_student": same, "cpu_test_acc": acc}


def check_method(label: str, path: Path, sizes: Sizes, data_dir: str, device: str, work: Path) -> dict[str, Any]:
    """One short bf16 epoch of one config: loss finite, accuracy above chance, checkpoint reloadable on CPU."""
    sets = run_overrides(load_config(path), sizes, data_dir, device)
    cfg = load_config(path, sets)
    out = work / "methods" / label.replace(":", "-")
    lines: list[str] = []
    trainer = Trainer(cfg, out, log=lines.append)
    try:
        record = trainer.fit().history[-1]
        chance = 100.0 / trainer.data.num_classes
        acc = record.get("test_acc", record.get("test_pixel_acc"))
        reload = reload_on_cpu(trainer, out)
    finally:
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    skip = {"train_loss", "train_acc", "train_pixel_acc", "train_images_per_s"}
    terms = {k.removeprefix("train_"): v for k, v in record.items() if k.startswith("train_") and k not in skip}
    errors = []
    if not math.isfinite(record["train_loss"]):
        errors.append(f"train loss {record['train_loss']}")
    if acc is None or not acc > chance:
        errors.append(f"test accuracy {acc} not above chance {chance:.1f}")
    if not reload["cpu_test_acc"] > chance:
        errors.append(f"CPU-reloaded student: test accuracy {reload['cpu_test_acc']:.2f} not above chance")
    if not reload["last_equals_student"] or reload["epoch"] != 1:
        errors.append("last.pt does not hold the final student of epoch 1")
    overrides = [s for s in sets if not s.startswith(("data.data_dir=", "data.scenes.source_dir=", "train.device="))]
    return {"ok": not errors, "error": "; ".join(errors) or None, "config": str(path.relative_to(ROOT)),
            "overrides": overrides, "train_loss": record["train_loss"], "terms": terms, "test_acc": acc,
            "test_miou": record.get("test_miou"),
            "chance": chance, **reload, "log_tail": lines[-3:]}


def check_methods(sizes: Sizes, data_dir: str, device: str, work: Path, only: list[str] | None) -> dict[str, Any]:
    """Every discovered method config (see :func:`discover_configs`), each as its own sub-check."""
    configs, missing = discover_configs()
    results: dict[str, Any] = {}
    dense: dict[str, int] = {}
    for label, path in configs.items():
        if only and label not in only and not any(o.endswith(":") and label.startswith(o) for o in only):
            continue
        family = label.split(":")[0] if ":" in label else None
        if family is not None and sizes.dense_limit is not None:
            dense[family] = dense.get(family, 0) + 1
            if dense[family] > sizes.dense_limit:
                results[label] = {"ok": True, "config": str(path.relative_to(ROOT)),
                                  "skipped": f"runs {sizes.dense_limit} {family} config(s) (--dense-limit)"}
                continue
        results[label] = run_check(check_method, label, path, sizes, data_dir, device, work)
        print_method(label, results[label])
    skipped = [label for label, r in results.items() if "skipped" in r]
    if skipped:
        print(f"  skipped (--dense-limit {sizes.dense_limit}): {', '.join(skipped)}", flush=True)
    return {"ok": all(r["ok"] for r in results.values()) and bool(results), "runs": results,
            "methods_without_config": missing}


# ---------------------------------------------------------------------------------------------------------
# 2. torchrun + SyncBatchNorm + resume
# ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_ddp(sizes: Sizes, data_dir: str, device: str, work: Path, nproc: int, timeout: float) -> dict[str, Any]:
    """``torchrun -m featkd train`` (KD config, sync_batchnorm) for 1 epoch, then ``--resume`` to 2 epochs."""
    cfg = load_config(KD_CONFIG)
    sets = [s for s in run_overrides(cfg, sizes, data_dir, "auto") if not s.startswith("train.epochs=")]
    sets += ["train.sync_batchnorm=true", "train.num_threads=1"]
    out = work / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine: the ranks must not find CUDA either

    def launch(epochs: int, resume: bool) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "featkd", "train",
               str(KD_CONFIG.relative_to(ROOT)), "--out", str(out)]
        for s in [*sets, f"train.epochs={epochs}"]:
            cmd += ["--set", s]
        if resume:
            cmd.append("--resume")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: a hung job is ended whole
        try:
            text, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            text = proc.communicate()[0] + f"\ntimed out after {timeout:.0f} s"
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        found = re.search(r"(\d+) process\(es\) on (\S+)", text)
        run = {"returncode": proc.returncode, "seconds": time.perf_counter() - t0, "summary": summary,
               "processes": int(found[1]) if found else None, "device": found[2] if found else None,
               "resumed": "resumed from" in text,
               "sync_batchnorm_applied": nproc > 1 and device == "cuda" and "sync_batchnorm needs CUDA" not in text,
               "command": " ".join(cmd[1:]).replace(str(work), "WORK")}
        if proc.returncode != 0:
            run["output_tail"] = text[-3000:]
        return run

    first = launch(1, resume=False)
    second = launch(2, resume=True) if first["returncode"] == 0 else None
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    errors = []
    for name, run, epochs in (("first run", first, 1), ("resume", second, 2)):
        if run is None:
            errors.append(f"{name}: not run")
            continue
        s = run["summary"]
        if run["returncode"] != 0:
            errors.append(f"{name}: exit status {run['returncode']}: {run['output_tail'][-400:]}")
        elif s.get("world_size") != nproc or s.get("epochs") != epochs or s.get("status") != "finished":
            errors.append(f"{name}: summary {s.get('world_size')} ranks, {s.get('epochs')} epochs, {s.get('status')}")
    if second is not None and second["returncode"] == 0:
        last = history[-1] if history else {}
        if not second["resumed"]:
            errors.append("resume: no 'resumed from' line")
        if [r.get("epoch") for r in history] != [1, 2]:
            errors.append(f"metrics.jsonl epochs {[r.get('epoch') for r in history]}, expected [1, 2]")
        if not math.isfinite(last.get("train_loss", math.nan)) or not last.get("test_acc", 0) > 10.0:
            errors.append(f"resumed epoch 2: loss {last.get('train_loss')}, test_acc {last.get('test_acc')}")
        if device == "cuda" and not second["sync_batchnorm_applied"]:
            errors.append("train.sync_batchnorm was not applied on CUDA")
    note = None
    if nproc == 1:  # featkd/distributed.py: torchrun's single rank still joins a process group
        note = ("world size 1: a real process group, DDP and SyncBatchNorm modules, but no cross-GPU "
                "reduction (SyncBatchNorm itself syncs only with two or more GPUs)")
    elif device != "cuda":
        note = "CPU: gloo DDP exercised; SyncBatchNorm is CUDA-only (the trainer keeps per-rank statistics)"
    return {"ok": not errors, "error": "; ".join(errors) or None, "world_size": nproc,
            "backend": "nccl" if device == "cuda" else "gloo", "note": note,
            "first": first, "resume": second,
            "epochs": [{k: r.get(k) for k in ("epoch", "train_loss", "test_acc")} for r in history]}


# ---------------------------------------------------------------------------------------------------------
# 3. images/s: featkd's KD step vs a hand-written loop
# ---------------------------------------------------------------------------------------------------------


def is_channels_last(model: torch.nn.Module) -> bool:
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def is_compiled(trainer: Trainer) -> bool:
    return any(hasattr(v, "_orig_mod") for v in vars(trainer).values())  # torch.compile's OptimizedModule


def fixed_batches(trainer: Trainer, size: int, channels_last: bool, n: int = 2) -> list[tuple[Tensor, Tensor]]:
    """``n`` device batches from the trainer's own loader, resized to ``size`` px (and channels-last)."""
    loader = trainer.train_loader
    loader.set_epoch(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batches = []
    for x, y in loader:
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        batches.append((x.contiguous(memory_format=memory_format), y))
        if len(batches) == n:
            break
    return batches


def throughput_row(pair: Pair, amp: bool, channels_last: bool, compile: bool, sizes: Sizes, cifar_dir: str,
                   device: str) -> dict[str, Any]:
    """Seconds per step and images/s of featkd and of the hand loop (and its inference-mode teacher)."""
    method = load_config(KD_CONFIG).method  # the KD config's options: T = 4, CE 0.5, KD 0.5
    raw = {
        "name": f"throughput-{pair.name}",
        "data": {"dataset": "cifar10", "data_dir": cifar_dir, "batch_size": pair.batch, "augment": False},
        "teacher": {"model": pair.teacher}, "student": {"model": pair.student}, "method": method,
        "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 1, "device": device, "amp": "bf16" if amp else "none", "channels_last": channels_last,
                  "compile": compile, "progress": "off", "tensorboard": False},
    }
    cfg = build_config(raw)
    trainer = Trainer(cfg, out_dir=None, log=lambda _m: None)
    batches = fixed_batches(trainer, pair.image_size, channels_last)
    opts = {"batches": batches, "amp": amp, "channels_last": channels_last, "compile": compile}
    fns = {"featkd": step_on(trainer, batches), "hand": hand_written_step(cfg, trainer, True, **opts)}
    if not compile:  # the teacher-mode comparison needs no compiled copies (each costs a compilation)
        fns["hand_inference_mode"] = hand_written_step(cfg, trainer, True, teacher_mode="inference_mode", **opts)
    times = time_interleaved(fns, rounds=sizes.rounds, calls=sizes.calls, warmup=sizes.warmup + 2 * compile,
                             device=trainer.device)
    applied = {"channels_last": is_channels_last(trainer.student), "compile": is_compiled(trainer)}
    del trainer, fns, batches
    if compile:
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    med = {k: v["median"] for k, v in times.items()}
    row = {"pair": pair.name, "teacher": pair.teacher, "student": pair.student, "image_size": pair.image_size,
           "batch": pair.batch, "dtype": "bf16" if amp else "fp32", "channels_last": channels_last,
           "compile": compile, "featkd_applied": applied, "seconds_per_step": times,
           "images_per_s": {k: pair.batch / v for k, v in med.items()},
           "ratio_featkd_over_hand": med["featkd"] / med["hand"]}
    if "hand_inference_mode" in med:
        row["ratio_inference_mode_over_no_grad"] = med["hand_inference_mode"] / med["hand"]
    ok = all(math.isfinite(v) and v > 0 for v in med.values())
    return {"ok": ok, "error": None if ok else f"bad timings {med}", **row}


def detection_throughput_row(pair: Pair, sizes: Sizes, fashion_dir: str, device: str) -> dict[str, Any]:
    """Seconds per step and images/s of featkd's detection step and of torchvision's loop written by hand: bf16
    autocast, eager, FitNets (``configs/scenes-det-fitnets-*.yaml``'s method: every FPN level, paired by
    stride) from a random-weight teacher, on scenes-det canvases generated from the prepared Fashion-MNIST."""
    from step_overhead import DET_FITNETS

    from featkd.config import load_raw

    resize = {"min_size": pair.image_size, "max_size": pair.image_size}  # torchvision resizes to the size they have
    raw = {
        "name": f"throughput-{pair.name}",
        "data": {"dataset": "scenes-det", "data_dir": str(Path(fashion_dir).parent / "scenes"),
                 "scenes": {"source_dir": fashion_dir, "canvas_size": DET_CANVAS, "train_size": sizes.det_scenes[0],
                            "test_size": sizes.det_scenes[1]},
                 "image_size": None if pair.image_size == DET_CANVAS else pair.image_size,
                 "batch_size": pair.batch, "eval_batch_size": pair.batch},
        "teacher": {"model": pair.teacher, "options": resize}, "student": {"model": pair.student, "options": resize},
        "method": load_raw(DET_FITNETS)["method"],
        "optim": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "schedule": "constant"},
        "train": {"epochs": 1, "device": device, "amp": "bf16", "progress": "off", "tensorboard": False},
    }
    cfg = build_config(raw)
    trainer = Trainer(cfg, out_dir=None, log=lambda _m: None)
    loader = trainer.train_loader
    loader.set_epoch(0)
    batches = [b for _, b in zip(range(2), loader)]
    fns = {"featkd": step_on(trainer, batches),
           "hand": hand_written_detection_step(cfg, trainer, batches=batches, amp=True)}
    times = time_interleaved(fns, rounds=sizes.rounds, calls=sizes.calls, warmup=sizes.warmup, device=trainer.device)
    levels = len(trainer.distiller.pairs)
    del trainer, fns, batches
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    med = {k: v["median"] for k, v in times.items()}
    row = {"pair": pair.name, "task": "detection", "teacher": pair.teacher, "student": pair.student,
           "image_size": pair.image_size, "batch": pair.batch, "dtype": "bf16", "channels_last": False,
           "compile": False, "method": f"fitnets ({levels} FPN levels)", "seconds_per_step": times,
           "images_per_s": {k: pair.batch / v for k, v in med.items()},
           "ratio_featkd_over_hand": med["featkd"] / med["hand"]}
    ok = all(math.isfinite(v) and v > 0 for v in med.values())
    return {"ok": ok, "error": None if ok else f"bad timings {med}", **row}


def check_throughput(sizes: Sizes, cifar_dir: str, fashion_dir: str, device: str, deadline: float,
                     compile: bool) -> dict[str, Any]:
    """Every eager row (pair x dtype x channels-last), the detection pairs, then compile rows while the time
    budget lasts."""
    eager = [(p, amp, cl, False) for p in sizes.pairs for amp in (False, True) for cl in (False, True)]
    compiled = [(p, amp, cl, True) for amp in (True, False) for cl in (True, False) for p in sizes.pairs]
    rows, det_rows, reserve = [], [], sizes.compile_reserve_s
    for i, (pair, amp, cl, comp) in enumerate(eager + compiled):
        if i == len(eager):  # after the eager rows, before the optional compile rows: the detection pairs
            for det in sizes.det_pairs:
                tag = {"pair": det.name, "task": "detection", "dtype": "bf16", "channels_last": False, "compile": False}
                det_rows.append({**tag, **run_check(detection_throughput_row, det, sizes, fashion_dir, device)})
                print_throughput(det_rows[-1])
        tag = {"pair": pair.name, "dtype": "bf16" if amp else "fp32", "channels_last": cl, "compile": comp}
        if comp and not compile:
            rows.append({**tag, "ok": True, "skipped": "compile rows off (CPU mode default; --compile on)"})
            continue
        if comp and deadline - time.monotonic() < reserve:
            rows.append({**tag, "ok": True, "skipped": f"time budget: under {reserve:.0f} s left"})
            print_throughput(rows[-1])
            continue
        t0 = time.monotonic()
        rows.append({**tag, **run_check(throughput_row, pair, amp, cl, comp, sizes, cifar_dir, device)})
        if comp:  # the next compile row starts only if one as slow as the slowest so far still fits
            reserve = max(reserve, 1.2 * (time.monotonic() - t0))
        print_throughput(rows[-1])
    return {"ok": all(r["ok"] for r in rows + det_rows), "rows": rows, "detection_rows": det_rows,
            "note": "ratio_featkd_over_hand = featkd's seconds per step / the hand loop's (same options); "
                    "featkd_applied: whether the trainer honoured train.channels_last / train.compile; "
                    "detection_rows: RetinaNet pairs, bf16, featkd's FitNets step vs torchvision's loop by hand"}


# ---------------------------------------------------------------------------------------------------------
# running, recording, printing
# ---------------------------------------------------------------------------------------------------------


def run_check(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` with its wall time; an exception becomes ``{"ok": False, "error": ...}``."""
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    return {**result, "seconds": round(time.perf_counter() - t0, 2)}


def environment_info(cuda: bool) -> dict[str, Any]:
    import torchvision

    info = environment()
    info.update({
        "torchvision": torchvision.__version__, "python": platform.python_version(), "cuda_available": cuda,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "cuda_version": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    })
    with contextlib.suppress(Exception):  # a tuple in recent torch, an int in older ones
        version = torch.cuda.nccl.version() if cuda else None
        info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else version
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    return info


def print_method(label: str, r: dict[str, Any]) -> None:
    if r.get("train_loss") is None:
        print(f"  {label:<20} FAIL  {r['error']}", flush=True)
        return
    print(f"  {label:<20} {'ok  ' if r['ok'] else 'FAIL'}  loss {r['train_loss']:8.4f}  test acc {r['test_acc']:6.2f}"
          f"  cpu reload {r['cpu_test_acc']:6.2f}  {r['seconds']:6.1f}s" + (f"  {r['error']}" if r["error"] else ""),
          flush=True)


def print_throughput(r: dict[str, Any]) -> None:
    where = f"  {r['pair']:<26} {r['dtype']:<5} cl {'on ' if r['channels_last'] else 'off'} " \
            f"compile {'on ' if r['compile'] else 'off'}"
    if "images_per_s" not in r:
        print(f"{where}  {r.get('skipped') or 'FAIL ' + str(r['error'])}", flush=True)
        return
    ips = r["images_per_s"]
    inf = f"  inference_mode/no_grad {r['ratio_inference_mode_over_no_grad']:.3f}" \
        if "ratio_inference_mode_over_no_grad" in r else ""
    print(f"{where}  featkd {ips['featkd']:9.1f} img/s  hand {ips['hand']:9.1f} img/s  "
          f"featkd/hand {r['ratio_featkd_over_hand']:.3f}{inf}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", help=f"JSON result (default: {DEFAULT_OUT['cuda']}; CPU: {DEFAULT_OUT['cpu']})")
    parser.add_argument("--data", type=Path, help="the .npz written by --make-data (default: --source-dir)")
    parser.add_argument("--make-data", type=Path, metavar="NPZ", help="write the Fashion-MNIST subset and exit")
    parser.add_argument("--source-dir", type=Path, default=FASHION_MNIST_DIR, help="installed Fashion-MNIST")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: the CPU mode even with CUDA")
    parser.add_argument("--only", default="methods,ddp,throughput", help="comma-separated checks to run")
    parser.add_argument("--methods", help="comma-separated method labels, or a family such as scenes-seg: "
                        "(default: every discovered config)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile rows of the throughput table (auto: on CUDA only)")
    parser.add_argument("--time-budget", type=float, help="seconds before compile rows are skipped")
    parser.add_argument("--dense-limit", type=int, help="configs run per dense family (default: all; CPU mode: 0)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder (run folders, data)")
    args = parser.parse_args(argv)
    if args.make_data:
        make_data(args.make_data, args.source_dir)
        return 0

    start = time.monotonic()
    cuda = torch.cuda.is_available() and args.device == "auto"
    mode = "cuda" if cuda else "cpu"
    sizes = GPU_SIZES if cuda else CPU_SIZES
    if cuda:
        sizes = dataclasses.replace(sizes, ddp_nproc=max(1, torch.cuda.device_count()))
    if args.time_budget is not None:
        sizes = dataclasses.replace(sizes, time_budget_s=args.time_budget)
    if args.dense_limit is not None:
        sizes = dataclasses.replace(sizes, dense_limit=args.dense_limit)
    compile = sizes.compile if args.compile == "auto" else args.compile == "on"
    only = set(args.only.split(","))
    out = Path(args.out or ROOT / DEFAULT_OUT[mode])
    work = Path(tempfile.mkdtemp(prefix="featkd-gpu-check-"))
    print(f"featkd gpu check: {mode} mode, torch {torch.__version__}, work folder {work}", flush=True)
    report: dict[str, Any] = {"benchmark": "gpu_check", "mode": mode, "command": " ".join(sys.argv),
                              "environment": environment_info(cuda), "sizes": dataclasses.asdict(sizes)}
    checks: dict[str, Any] = {}
    try:
        checks["data"] = run_check(prepare_data, args.data, args.source_dir, sizes, work)
        if checks["data"]["ok"]:
            fashion, cifar = checks["data"]["fashion_dir"], checks["data"]["cifar_dir"]
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the torchrun job runs beside the methods
                ddp = pool.submit(run_check, check_ddp, sizes, fashion, mode, work, sizes.ddp_nproc,
                                  150.0 if cuda else 120.0) if "ddp" in only else None
                if "methods" in only:
                    print("methods (one bf16 epoch each):", flush=True)
                    checks["methods"] = run_check(check_methods, sizes, fashion, mode, work,
                                                  args.methods.split(",") if args.methods else None)
                if ddp is not None:
                    checks["ddp"] = ddp.result()
                    d = checks["ddp"]
                    print(f"torchrun: world size {d.get('world_size')} ({d.get('backend') or 'no process group'}), "
                          f"sync_batchnorm, resume: {'ok' if d['ok'] else 'FAIL ' + str(d['error'])}  "
                          f"{d['seconds']:.1f}s" + (f"  [{d['note']}]" if d.get("note") else ""), flush=True)
            if "throughput" in only:
                print("throughput (KD step; detection: FitNets step; interleaved medians):", flush=True)
                deadline = start + sizes.time_budget_s
                checks["throughput"] = run_check(check_throughput, sizes, cifar, fashion, mode, deadline, compile)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    failed = {name: c.get("error") for name, c in checks.items() if not c["ok"] and c.get("error")}
    for label, r in checks.get("methods", {}).get("runs", {}).items():
        if not r["ok"]:
            failed[f"methods/{label}"] = r["error"]
    for r in checks.get("throughput", {}).get("rows", []) + checks.get("throughput", {}).get("detection_rows", []):
        if not r["ok"]:
            failed[f"throughput/{r['pair']}/{r['dtype']}/cl={r['channels_last']}/compile={r['compile']}"] = r["error"]
    if checks.get("methods", {}).get("runs") == {}:
        failed["methods"] = "no method config found"
    report.update({"checks": checks, "failed": failed, "ok": not failed,
                   "wall_s": round(time.monotonic() - start, 1)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} in {report['wall_s']:.0f}s; "
          f"wrote {out}", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
