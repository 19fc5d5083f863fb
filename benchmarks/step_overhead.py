"""Does featkd's trainer add anything to a training step?  (issue: core, "Speed")

Times, side by side in one run (interleaved rounds, median per step), a plain hand-written PyTorch step and
``Trainer.train_step`` on the same teacher/student pair, batch and in-memory data, for a CE-only step and a
Hinton-KD step, on a classifier pair (Fashion-MNIST) and a segmenter pair (scenes: pixel cross-entropy and
per-pixel KD), and for a detector (scenes-det, FCOS-ResNet-8: the student alone, and FitNets on every FPN
level from FCOS-ResNet-20: torchvision's training loop written by hand, :func:`hand_written_detection_step`),
and writes the ratios featkd / hand-written as JSON (with the per-round ratios' spread). Target: <= 1.05 for
every row.

    python benchmarks/step_overhead.py [--dataset fashion-mnist] [--batch 128] [--rows det-none,det-fitnets] \
        [--out benchmarks/results/step_overhead.json]

``--rows`` re-measures only the named rows and merges them into the existing ``--out`` file (each row measured
so records its own ``environment``). ``--clock cpu`` times this process's CPU time instead of wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from featkd.bench.timing import environment, paired_ratios, time_interleaved, trainer_step
from featkd.config import build_config, optimizer_class
from featkd.engine.trainer import Trainer
from featkd.models import create_model

IGNORE_INDEX = 255  # the segmentation data sets' void label; no class id reaches it
KD = {"name": "kd", "kd_temperature": 4.0, "ce_weight": 0.5, "kd_weight": 0.5}
ROOT = Path(__file__).resolve().parents[1]
DET_FITNETS = ROOT / "configs" / "scenes-det-fitnets-fcos_resnet20-fcos_resnet8.yaml"
_FPN_LEVEL = re.compile(r"^backbone\.fpn\[(?P<key>[^\]]+)\]$")  # "backbone.fpn[0]" -> "0"


def loop_setup(trainer: Any, batches: list | None, teacher_mode: str, amp: bool) -> tuple[list, Any, Any]:
    """The hand-written loops' shared setup: their batches (the trainer's first four of epoch 0 unless given),
    the teacher's no-grad context and the autocast context."""
    if batches is None:
        loader = trainer.train_loader
        loader.set_epoch(0)
        batches = [b for _, b in zip(range(4), loader)]
    no_grad = torch.inference_mode if teacher_mode == "inference_mode" else torch.no_grad
    autocast = (lambda: torch.autocast(device_type=trainer.device.type, dtype=torch.bfloat16)) if amp \
        else contextlib.nullcontext
    return batches, no_grad, autocast


def hand_written_step(cfg, trainer: Trainer, kd: bool, *, batches: list[tuple[Tensor, Tensor]] | None = None,
                      amp: bool = False, channels_last: bool = False, compile: bool = False,
                      teacher_mode: Literal["no_grad", "inference_mode"] = "no_grad"):
    """The loop a user would write by hand: same models (fresh copies), optimiser and batches.

    The keyword options are what a user would add by hand on a GPU (``benchmarks/gpu_check.py``): fixed
    ``batches`` (default: 4 from the trainer's loader), bf16 autocast, channels-last models and inputs,
    ``torch.compile`` of both models, and the teacher under ``torch.inference_mode`` instead of ``no_grad``.
    """
    data = trainer.data
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    make = lambda spec: create_model(spec.model, num_classes=data.num_classes,  # noqa: E731
                                     in_channels=data.input_shape[0], **spec.options).to(trainer.device)
    student = make(cfg.student)
    student.load_state_dict(trainer.student.state_dict())
    student.to(memory_format=memory_format)
    teacher = None
    if kd:
        teacher = make(cfg.teacher).eval()
        teacher.load_state_dict(trainer.teacher.state_dict())
        teacher.requires_grad_(False)
        teacher.to(memory_format=memory_format)
    oc = cfg.optim
    opt = torch.optim.SGD(student.parameters(), lr=oc.lr, momentum=oc.momentum, nesterov=oc.nesterov,
                          weight_decay=oc.weight_decay)
    student_fwd = torch.compile(student) if compile else student
    teacher_fwd = torch.compile(teacher) if compile and teacher is not None else teacher
    method = cfg.method
    batches, no_grad, autocast = loop_setup(trainer, batches, teacher_mode, amp)
    batches = [(x.contiguous(memory_format=memory_format) if x.dim() == 4 else x, y) for x, y in batches]
    state = {"i": 0}
    student.train()

    def step() -> None:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        with autocast():
            logits = student_fwd(x)
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)  # masks (B, H, W) or class ids (B,)
            if kd:
                with no_grad():
                    t_logits = teacher_fwd(x)
                t = method["kd_temperature"]
                # KL over the class axis, mean over examples (and pixels): batchmean for (B, K) logits
                kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(t_logits / t, 1), reduction="none",
                              log_target=True).sum(1).mean()
                loss = method["ce_weight"] * loss + method["kd_weight"] * t * t * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # a hand-written loop logs its loss too

    return step


def make_optimizer(cfg, groups: list[list[torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The optimiser of ``cfg.optim`` over parameter groups, as the trainer builds it (a user copies it)."""
    oc = cfg.optim
    groups = [{"params": g} for g in groups if g]
    return optimizer_class(oc.optimizer)(groups, **oc.optimizer_kwargs())


def hand_written_detection_step(cfg, trainer: Trainer, *, batches: list[tuple[Tensor, list]] | None = None,
                                amp: bool = False, teacher_mode: Literal["no_grad", "inference_mode"] = "no_grad"):
    """torchvision's detection training loop written by hand, on fresh copies of the trainer's models::

        loss = sum(student(images, targets).values())            # the student alone (method none)
        loss.backward(); opt.step()

    With FitNets (``trainer.distiller`` pairs ``backbone.fpn[k]`` levels, as the scenes-det config does) the
    teacher runs in eval mode under ``no_grad`` (or ``inference_mode``) on its ``transform`` and ``backbone``
    only, which return its FPN levels (what a user who knows torchvision's detectors writes: the heads and
    post-processing would only be thrown away), a forward hook on the student's FPN keeps its levels, and
    ``weight * sum(mse(connector(s), t))`` is added, with copies of the trainer's fresh 1x1 connectors, all in
    the optimiser of the config. The targets are the loader's as they come (scenes have no crowd regions nor
    degenerate boxes, which featkd drops before the student sees them).
    """
    data = trainer.data
    make = lambda spec: create_model(spec.model, num_classes=data.num_classes,  # noqa: E731
                                     in_channels=data.input_shape[0], **spec.options).to(trainer.device)
    student = make(cfg.student)
    student.load_state_dict(trainer.student.state_dict())
    method = cfg.method_name
    teacher, connectors, levels = None, None, []
    if method != "none":
        if method != "fitnets":
            raise ValueError(f"the hand-written detection loop has the student alone and FitNets, not {method!r}")
        teacher = make(cfg.teacher).eval()
        teacher.load_state_dict(trainer.teacher.state_dict())
        teacher.requires_grad_(False)
        for s, t in trainer.distiller.pairs:
            ms, mt = _FPN_LEVEL.match(s), _FPN_LEVEL.match(t)
            if ms is None or mt is None:
                raise ValueError(f"the hand-written loop distils FPN levels backbone.fpn[k], not {s!r} / {t!r}")
            levels.append((ms["key"], mt["key"]))
        connectors = copy.deepcopy(trainer.distiller.connectors)  # the same fresh 1x1 convs
        weight = cfg.method["weight"]
    opt = make_optimizer(cfg, [[p for p in student.parameters() if p.requires_grad],
                               [] if connectors is None else list(connectors.parameters())])
    s_fpn: dict[str, Tensor] = {}
    if teacher is not None:
        student.backbone.fpn.register_forward_hook(lambda _m, _a, out: s_fpn.update(out))
    batches, no_grad, autocast = loop_setup(trainer, batches, teacher_mode, amp)
    state = {"i": 0}
    student.train()

    def step() -> None:
        images, targets = batches[state["i"] % len(batches)]
        state["i"] += 1
        with autocast():
            loss = sum(student(images, targets).values())
            if teacher is not None:
                with no_grad():
                    t_fpn = teacher.backbone(teacher.transform(list(images))[0].tensors)
                loss = loss + weight * sum(
                    F.mse_loss(conn(s_fpn[s]).float(), t_fpn[t].float())
                    for (s, t), conn in zip(levels, connectors, strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # a hand-written loop logs its loss too

    return step


def rows(args: argparse.Namespace) -> dict[str, dict]:
    """Row name -> experiment config: CE-only and KD steps on the classifier pair, and on the scenes
    segmentation pair (configs/base/scenes-seg.yaml's data and models, teacher weights random: the step's
    cost does not depend on them)."""
    common = {"optim": {"lr": 0.05, "schedule": "constant"},
              "train": {"epochs": 1, "device": args.device, "progress": "off", "tensorboard": False}}
    out = {}
    for method in ({"name": "none"}, KD):
        out[method["name"]] = {
            "data": {"dataset": args.dataset, "batch_size": args.batch},
            "teacher": {"model": args.teacher}, "student": {"model": args.student}, "method": method, **common}
    from featkd.config import load_raw

    if args.segmentation:
        base = load_raw(ROOT / "configs" / "base" / "scenes-seg.yaml")
        data = {**base["data"], "train_subset": None, "batch_size": args.seg_batch}
        for method in ({"name": "none"}, {**KD, "kd_temperature": 1.0}):
            out[f"seg-{method['name']}"] = {
                "data": data, "teacher": {"model": base["teacher"]["model"]}, "student": base["student"],
                "method": method, **common}
    if args.detection:
        # configs/base/scenes-det.yaml's data, models and optimiser (AdamW; constant LR: the hand loop has no
        # schedule), teacher weights random; FitNets as configs/scenes-det-fitnets-*.yaml (every FPN level)
        base = load_raw(ROOT / "configs" / "base" / "scenes-det.yaml")
        data = {**base["data"], "batch_size": args.det_batch}
        optim = {**{k: v for k, v in base["optim"].items() if k != "warmup_epochs"}, "schedule": "constant"}
        for method in ({"name": "none"}, load_raw(DET_FITNETS)["method"]):
            out[f"det-{method['name']}"] = {
                "data": data, "teacher": {"model": base["teacher"]["model"]}, "student": base["student"],
                "method": method, "optim": optim, "train": common["train"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=["digits", "fashion-mnist"])
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--segmentation", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the scenes segmentation pair (default on)")
    parser.add_argument("--seg-batch", type=int, default=32)
    parser.add_argument("--detection", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the scenes-det detector pair (default on)")
    parser.add_argument("--det-batch", type=int, default=8, help="canvases per detection step (96 px)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--det-rounds", type=int, default=21, help="rounds of the detection rows")
    parser.add_argument("--det-calls", type=int, default=5, help="calls per round of the detection rows")
    parser.add_argument("--rows", help="comma-separated rows to measure (merged into the existing --out file)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (time.process_time: not inflated by other jobs "
                        "on a crowded CPU machine; CPU runs only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/step_overhead.json")
    args = parser.parse_args()

    planned = rows(args)
    only = args.rows.split(",") if args.rows else list(planned)
    unknown = [r for r in only if r not in planned]
    if unknown:
        parser.error(f"--rows: unknown row(s) {', '.join(unknown)}; rows: {', '.join(planned)}")
    previous = json.loads(Path(args.out).read_text()) if args.rows and Path(args.out).is_file() else {}
    results = dict(previous.get("results", {}))
    for name in only:
        raw = planned[name]
        cfg = build_config(raw)
        trainer = Trainer(cfg, out_dir=None, log=lambda _m: None)
        detection = trainer.task.name == "detection"
        hand = (hand_written_detection_step(cfg, trainer) if detection
                else hand_written_step(cfg, trainer, raw["method"]["name"] == "kd"))
        times = time_interleaved(
            {"hand_written": hand, "featkd": trainer_step(trainer)},
            rounds=args.det_rounds if detection else args.rounds, calls=args.det_calls if detection else args.calls,
            device=trainer.device, clock=time.process_time if args.clock == "cpu" else time.perf_counter,
        )
        ratio = times["featkd"]["median"] / times["hand_written"]["median"]
        per_round = paired_ratios(times, "featkd", "hand_written")
        results[name] = {"seconds_per_step": times, "ratio_featkd_over_hand_written": ratio,
                         "ratio_per_round": per_round, "clock": args.clock,
                         "task": trainer.task.name, "method": cfg.method_name, "teacher": cfg.teacher.model,
                         "student": cfg.student.model, "batch": cfg.data.batch_size,
                         "input_shape": list(trainer.data.input_shape), "environment": environment()}
        print(f"{name:>11}: hand-written {times['hand_written']['median'] * 1e3:.1f} ms/step, "
              f"featkd {times['featkd']['median'] * 1e3:.1f} ms/step, ratio {ratio:.3f} (per round: median "
              f"{per_round['median']:.3f}, quartiles {per_round['q1']:.3f}-{per_round['q3']:.3f}, "
              f"range {per_round['min']:.3f}-{per_round['max']:.3f}, {per_round['rounds']} rounds)", flush=True)
        del trainer, hand
    out = {"benchmark": "step_overhead", "dataset": args.dataset, "teacher": args.teacher,
           "student": args.student, "batch": args.batch, "device": args.device, "target_ratio": 1.05,
           "results": results, "environment": previous.get("environment", environment())}  # rows carry their own
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
