"""The papers' own settings as protocols (``benchmarks/protocols/paper-*.yaml``): the bill and a smoke run.

``featkd bench paper-X --estimate`` (no results file): what a full run of the protocol costs, from the models'
FLOPs counted here rather than from earlier runs (there are none at this scale). Per row: runs (seeds),
epochs, training images per epoch (the protocol's ``train_images``: the real data set's size), the FLOPs of
one training image (``3 x`` the student's forward for its forward and backward, plus the teacher's forward,
counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one image at the protocol's training input
size) and the GPU hours at an effective rate: ``--gpu-tflops`` (default :data:`DEFAULT_GPU_TFLOPS`, about
10 % of an H100's dense bf16 peak), or the rate a ``gpu_check`` measurement implies where
``benchmarks/results/gpu_check.json`` exists. Method overhead (MGD's matching passes, DFA's search, CRD's
memory) and evaluation are not counted: the estimate is a lower bound for the training alone.

``featkd bench paper-X --smoke --data-dir D``: every row of the protocol trained for two steps (batch 2,
four training images) and evaluated once, in this process, on the data in D (the real set, or the small
files the tests generate in its layout), with random weights wherever the protocol names pretrained ones
(offline) and the protocol's ``smoke:`` items where its real input size is too slow for a CPU. It checks that
every row builds, trains and evaluates on the protocol's models and shapes before any GPU hour is spent.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featkd.bench.protocol import Protocol
from featkd.bench.runner import cell_config
from featkd.errors import FeatkdError

#: TFLOP/s one GPU sustains on these models when nothing was measured: 100, about 10 % of an H100 SXM's dense
#: bf16 peak (989), the order convolutional training reaches once data loading and small kernels are counted
#: (not measured here: run `make gpu-check` on your GPU and pass --gpu-tflops). Depthwise convolutions and
#: small CIFAR models reach less; large dense models more.
DEFAULT_GPU_TFLOPS = 100.0

#: Option names that ask for downloaded weights; the smoke run sets them to None (random weights offline).
PRETRAINED_OPTIONS = ("weights", "weights_backbone", "pretrained")

SMOKE_SETTINGS = ("train.epochs=1", "data.batch_size=2", "data.eval_batch_size=2", "data.train_subset=4",
                  "data.num_workers=0", "train.eval_every=1", "train.progress=off", "train.tensorboard=false",
                  "train.device=cpu", "train.amp=none", 'train.teacher_eval="off"')


def row_config(protocol: Protocol, label: str, folder: Path, overrides: Sequence[str] = ()) -> Any:
    """The row's experiment config (:func:`featkd.bench.runner.cell_config`) with ``overrides``."""
    from featkd.config import apply_overrides, build_config, load_raw

    return build_config(apply_overrides(load_raw(cell_config(protocol, label, folder)), list(overrides)))


def without_downloads(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every pretrained-weights option of the teacher and the student set to None and their
    checkpoints removed: random weights, nothing fetched."""
    out = dict(raw)
    for role in ("teacher", "student"):
        spec = out.get(role)
        if not isinstance(spec, dict):
            continue
        spec = {k: v for k, v in spec.items() if k != "checkpoint"}
        out[role] = {**spec, "options": random_weight_options(spec.get("options") or {})}
    return out


def random_weight_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every pretrained-weights option (:data:`PRETRAINED_OPTIONS`) off."""
    return {k: (False if k == "pretrained" else None) if k in PRETRAINED_OPTIONS else v for k, v in options.items()}


def shrunk_to_one_epoch(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` for a one-epoch run: the learning-rate milestones as the fractions of the run they are, and the
    method's options counted in epochs (warm-ups, re-matching periods: :func:`featkd.bench.runner.scaled_schedule`)
    set to 0, so that every term is on in the two steps the smoke run trains."""
    from featkd.bench.runner import scaled_schedule

    epochs = int((raw.get("train") or {}).get("epochs", 1))
    out = {**raw, "optim": dict(raw.get("optim") or {}), "method": dict(raw["method"])}
    milestones = out["optim"].get("milestones")
    if milestones:
        out["optim"]["milestones"] = [m / epochs if m >= 1 else m for m in milestones]
    one = {**out, "train": {**(raw.get("train") or {}), "epochs": 1}}
    out["method"].update({k: 0 for k in scaled_schedule(out, one)})
    return out


def calibrate_batchnorm(model: nn.Module | None, loader: Any) -> None:
    """Running BatchNorm statistics measured on one training batch: random weights with the initial statistics
    (mean 0, variance 1) blow up through a deep network in eval mode (a random ResNet-110 teacher's last stage
    reaches inf), which would say nothing about the protocol. Only for the smoke run's random weights."""
    if model is None:
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    inputs, targets = next(iter(loader))[:2]
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: this batch's statistics exactly
    model.train()
    with torch.no_grad():
        try:
            model(inputs)
        except (TypeError, AssertionError, ValueError):  # a torchvision detector in train mode wants its targets
            model(inputs, targets)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


# ---- the bill ---------------------------------------------------------------------------------------------

def training_input(cfg: Any) -> tuple[int, int, int]:
    """(C, H, W) of one training image as the model sees it: the crop (classification, segmentation) or the
    resized image (detection: the shorter side ``resize_short``, 4:3, longer side capped by ``resize_max``)."""
    data = cfg.data
    channels = 3

    def pair(size: Any) -> tuple[int, int]:
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    if data.crop_size is not None:
        return (channels, *pair(data.crop_size))
    if data.resize_short is not None:
        short = max(data.resize_short) if isinstance(data.resize_short, list) else data.resize_short
        long = round(short * 4 / 3)
        if data.resize_max is not None:
            long = min(long, data.resize_max)
        return channels, short, long
    if data.image_size is not None:
        return (channels, *pair(data.image_size))
    sizes = {"cifar10": 32, "cifar100": 32, "cinic10": 32}
    side = sizes.get(data.dataset, 224)
    return channels, side, side


def forward_flops(model: nn.Module, shape: tuple[int, int, int]) -> float:
    """FLOPs of one forward pass of ``model`` (eval mode) on one image of ``shape``."""
    from torch.utils.flop_counter import FlopCounterMode

    from featkd.modes import eval_mode

    image = torch.rand(1, *shape)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        try:
            model(image)
        except (TypeError, AssertionError):  # a torchvision detector takes a list of images
            model([image[0]])
    return float(counter.get_total_flops())


def build_for_count(cfg: Any, role: str, num_classes: int) -> nn.Module | None:
    from featkd.models import create_model

    spec = cfg.teacher if role == "teacher" else cfg.student
    if spec is None:
        return None
    return create_model(spec.model, num_classes=num_classes, in_channels=3, **random_weight_options(spec.options or {}))


def measured_tflops(results_dir: Path) -> tuple[float, str] | None:
    """The effective TFLOP/s of a gpu_check run (its ``effective_tflops``), when its JSON exists."""
    path = results_dir / "gpu_check.json"
    if not path.is_file():
        return None
    rate = json.loads(path.read_text()).get("effective_tflops")
    return (float(rate), str(path)) if rate else None


def estimate(protocol: Protocol, labels: Sequence[str], seeds: int, gpu_tflops: float | None = None,
             num_classes: int = 1000, results_dir: Path = Path("benchmarks/results")) -> dict[str, Any]:
    """The protocol's cost from FLOPs (module docstring); ``num_classes``: the head's width (the protocol's
    ``published`` set's classes when known; a head is a small share of the FLOPs)."""
    if protocol.train_images is None:
        raise FeatkdError(f"protocol {protocol.name}: no train_images (the training set's size) to estimate from; "
                          "give --estimate RESULTS_JSON to scale earlier runs instead")
    rate, rate_source = gpu_tflops, "--gpu-tflops"
    if rate is None:
        measured = measured_tflops(results_dir)
        rate, rate_source = measured if measured else (DEFAULT_GPU_TFLOPS, "assumed: ~10 % of an H100's bf16 peak")
    counted: dict[tuple[str, str, tuple], float] = {}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in labels:
            cfg = row_config(protocol, label, Path(tmp))
            shape = training_input(cfg)
            flops = {}
            for role in ("student", "teacher"):
                spec = cfg.teacher if role == "teacher" else cfg.student
                if spec is None or (role == "teacher" and cfg.method_name == "none"):
                    flops[role] = 0.0
                    continue
                key = (spec.model, json.dumps(spec.options, sort_keys=True, default=str), shape)
                if key not in counted:
                    counted[key] = forward_flops(build_for_count(cfg, role, num_classes), shape)
                flops[role] = counted[key]
            per_image = 3 * flops["student"] + flops["teacher"]
            images = cfg.train.epochs * protocol.train_images * seeds
            total = per_image * images
            rows[label] = {"runs": seeds, "epochs": cfg.train.epochs, "images_per_epoch": protocol.train_images,
                           "input": list(shape), "student_gflops": flops["student"] / 1e9,
                           "teacher_gflops": flops["teacher"] / 1e9, "train_pflops": total / 1e15,
                           "gpu_hours": total / (rate * 1e12) / 3600}
    out = {"protocol": protocol.name, "gpu_tflops": rate, "rate_source": rate_source, "rows": rows,
           "gpu_hours": sum(r["gpu_hours"] for r in rows.values()), "runs": seeds * len(labels)}
    if protocol.teacher_recipe:
        out["teacher_gpu_hours"] = teacher_recipe_hours(protocol, rate, num_classes)
    return out


def teacher_recipe_hours(protocol: Protocol, rate: float, num_classes: int = 1000) -> float:
    """GPU hours of the protocol's ``teacher_recipe`` (the teacher trained alone, one run, at ``rate``)."""
    from featkd.config import load_config

    cfg = load_config(protocol.teacher_recipe)
    shape = training_input(cfg)
    flops = 3 * forward_flops(build_for_count(cfg, "student", num_classes), shape)
    return flops * cfg.train.epochs * (protocol.train_images or 0) / (rate * 1e12) / 3600


def estimate_text(est: dict[str, Any]) -> str:
    lines = [f"{'method':<12} {'runs':>4} {'epochs':>6} {'images/epoch':>12} {'input':>13} {'student':>9} "
             f"{'teacher':>9} {'GPU h':>8}"]
    for label, r in est["rows"].items():
        lines.append(f"{label:<12} {r['runs']:>4} {r['epochs']:>6} {r['images_per_epoch']:>12,} "
                     f"{'x'.join(map(str, r['input'])):>13} {r['student_gflops']:>7.2f}GF "
                     f"{r['teacher_gflops']:>7.2f}GF {r['gpu_hours']:>8.2f}")
    if est.get("teacher_gpu_hours") is not None:
        lines.append(f"{'teacher':<12} {1:>4} (its teacher_recipe, trained first: no published checkpoint) "
                     f"{est['teacher_gpu_hours']:.2f} GPU h")
    lines.append(f"estimate: {est['runs']} runs, {est['gpu_hours']:.1f} GPU hours at {est['gpu_tflops']:.0f} "
                 f"effective TFLOP/s ({est['rate_source']}); training FLOPs = epochs x images x (3 x student + "
                 "teacher forward) per image; method overhead and evaluation not counted (a lower bound)")
    return "\n".join(lines)


# ---- the smoke run ----------------------------------------------------------------------------------------

def smoke(protocol: Protocol, labels: Sequence[str], data_dir: str | Path, extra: Sequence[str] = (),
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every row for two training steps and one evaluation (module docstring); one dict per row with its
    metric, the input shape and the seconds it took. Raises on the first row that fails, naming it."""
    from featkd.config import apply_overrides, build_config, load_raw
    from featkd.engine.trainer import Trainer

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in labels:
            t0 = time.perf_counter()
            raw = load_raw(cell_config(protocol, label, Path(tmp) / "configs"))
            raw = shrunk_to_one_epoch(without_downloads(raw))
            sets = [*SMOKE_SETTINGS, f"data.data_dir={data_dir}", *protocol.smoke, *extra]
            cfg = build_config(apply_overrides(raw, sets))
            try:
                trainer = Trainer(cfg, None, log=lambda _m: None)  # writes nothing: no checkpoint to save
                for model in (trainer.teacher, trainer.student):
                    calibrate_batchnorm(model, trainer.train_loader)
                result = trainer.fit()
            except FeatkdError as exc:
                raise FeatkdError(f"protocol {protocol.name}, row {label}: {exc}") from None
            if result.test_metric is None:
                raise FeatkdError(f"protocol {protocol.name}, row {label}: no evaluation after the smoke steps")
            seconds = time.perf_counter() - t0
            shape = training_input(cfg)
            results.append({"method": label, "metric": result.metric, "value": result.test_metric,
                            "input": list(shape), "seconds": seconds})
            log(f"{protocol.name} {label}: 2 steps + 1 evaluation on {'x'.join(map(str, shape))} inputs, "
                f"test_{result.metric} {result.test_metric:.2f} (random weights), {seconds:.1f}s")
    return results
