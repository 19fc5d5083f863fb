"""Does featkd's trainer add anything to a training step?  (issue: core, "Speed")

Times, side by side in one run (interleaved rounds, median per step), a plain hand-written PyTorch step and
``Trainer.train_step`` on the same teacher/student pair, batch and in-memory data, for a CE-only step and a
Hinton-KD step, on a classifier pair (Fashion-MNIST) and a segmenter pair (scenes: pixel cross-entropy and
per-pixel KD), and writes the ratios featkd / hand-written as JSON. Target: <= 1.05 for every row.

    python benchmarks/step_overhead.py [--dataset fashion-mnist] [--batch 128] \
        [--out benchmarks/results/step_overhead.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from featkd.config import build_config
from featkd.engine.trainer import Trainer
from featkd.models import create_model
from featkd.timing import environment, time_interleaved, trainer_step

IGNORE_INDEX = 255  # the segmentation data sets' void label; no class id reaches it
KD = {"name": "kd", "kd_temperature": 4.0, "ce_weight": 0.5, "kd_weight": 0.5}


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
    if batches is None:
        loader = trainer.train_loader
        loader.set_epoch(0)
        batches = [b for _, b in zip(range(4), loader)]
    batches = [(x.contiguous(memory_format=memory_format) if x.dim() == 4 else x, y) for x, y in batches]
    no_grad = torch.inference_mode if teacher_mode == "inference_mode" else torch.no_grad
    autocast = (lambda: torch.autocast(device_type=trainer.device.type, dtype=torch.bfloat16)) if amp \
        else contextlib.nullcontext
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
    if args.segmentation:
        from featkd.config import load_raw

        base = load_raw(Path(__file__).resolve().parents[1] / "configs" / "base" / "scenes-seg.yaml")
        data = {**base["data"], "train_subset": None, "batch_size": args.seg_batch}
        for method in ({"name": "none"}, {**KD, "kd_temperature": 1.0}):
            out[f"seg-{method['name']}"] = {
                "data": data, "teacher": {"model": base["teacher"]["model"]}, "student": base["student"],
                "method": method, **common}
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
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/step_overhead.json")
    args = parser.parse_args()

    results = {}
    for name, raw in rows(args).items():
        cfg = build_config(raw)
        trainer = Trainer(cfg, out_dir=None, log=lambda _m: None)
        kd = raw["method"]["name"] == "kd"
        times = time_interleaved(
            {"hand_written": hand_written_step(cfg, trainer, kd), "featkd": trainer_step(trainer)},
            rounds=args.rounds, calls=args.calls, device=trainer.device,
        )
        ratio = times["featkd"]["median"] / times["hand_written"]["median"]
        results[name] = {"seconds_per_step": times, "ratio_featkd_over_hand_written": ratio,
                         "task": trainer.task.name, "teacher": cfg.teacher.model, "student": cfg.student.model,
                         "batch": cfg.data.batch_size}
        print(f"{name:>8}: hand-written {times['hand_written']['median'] * 1e3:.1f} ms/step, "
              f"featkd {times['featkd']['median'] * 1e3:.1f} ms/step, ratio {ratio:.3f}", flush=True)
    out = {"benchmark": "step_overhead", "dataset": args.dataset, "teacher": args.teacher,
           "student": args.student, "batch": args.batch, "device": args.device, "target_ratio": 1.05,
           "results": results, "environment": environment()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
