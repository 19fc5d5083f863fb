"""``featkd export RUN --format torchscript|onnx|safetensors [--out FILE]``: the student alone, verified.

RUN is a run folder (its ``config.yaml`` and ``student.pt``, else ``last.pt``; ``--best`` for ``best.pt``),
a featkd training checkpoint, or a plain state_dict / ``.safetensors`` file with ``--config``. The student is
rebuilt on the CPU from the run's config, its weights loaded, and written to FILE (default: beside the
weights, ``student.torchscript`` / ``student.onnx`` / ``student.safetensors``). The file is then loaded
back and its outputs compared with the PyTorch student's on the first ``--batch`` images of the test split;
the maximum absolute difference is printed, and a difference above ``--atol`` is an error (exit 2). See
:mod:`featkd.apps.export` for what each format holds and how it is checked (ONNX with onnxruntime when installed).
"""

from __future__ import annotations

import argparse

HELP = "write a trained student as TorchScript, ONNX or safetensors, verified against PyTorch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder, last.pt/best.pt, or a plain state_dict / .safetensors (with --config)")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx", "safetensors"])
    p.add_argument("--out", help="output file (default: student.<format extension> beside the weights)")
    p.add_argument("--config", help="experiment YAML (required for a plain state_dict)")
    p.add_argument("--best", action="store_true", help="with a run folder: export best.pt's student")
    p.add_argument("--batch", type=int, default=64, help="test images to compare outputs on (default 64)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted max abs difference (default 1e-4)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir", help="override data.data_dir (the test batch comes from the run's data)")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from featkd.apps.export import FORMATS, export_student
    from featkd.config import apply_overrides, build_config, load_config
    from featkd.engine import checkpoint as ckpt
    from featkd.engine.build import build_run
    from featkd.errors import FeatkdError
    from featkd.models import create_model

    source = Path(args.run)
    if args.batch < 2:
        raise FeatkdError(f"--batch {args.batch}: compare on at least 2 test images")
    if source.is_dir():
        weights = source / "best.pt" if args.best else ckpt.weights_path(source)
    else:
        weights = source
    overrides = [*args.overrides, "train.device=cpu"]
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.config:
        cfg = load_config(args.config, overrides)
    elif source.is_dir() and (source / "config.yaml").is_file():
        cfg = load_config(source / "config.yaml", overrides)
    else:
        state = ckpt.load_file(weights) if weights.suffix != ".safetensors" else None
        if not ckpt.is_training_checkpoint(state):
            raise FeatkdError(f"{weights} holds no config: pass --config to say which model and data it is for")
        cfg = build_config(apply_overrides(state["config"], overrides))
    # the student alone: no method, so no teacher is built or needed
    built = build_run(dataclasses.replace(cfg, method={"name": "none"}), log=lambda _m: None,
                      student_checkpoint=weights)
    loader = built.data.test_loader(args.batch, device="cpu")
    batch = next(iter(loader))[0][: args.batch]
    if batch.shape[0] < 2:
        raise FeatkdError(f"the test split of {cfg.data.dataset} has fewer than 2 images to compare on")
    out = Path(args.out) if args.out else weights.parent / f"student{FORMATS[args.format]}"
    spec = cfg.student

    def fresh_model() -> torch.nn.Module:
        return create_model(spec.model, num_classes=built.data.num_classes,
                            in_channels=built.data.input_shape[0], **spec.options)

    metadata = {"featkd_model": spec.model, "featkd_options": json.dumps(spec.options),
                "featkd_input_shape": "x".join(map(str, built.data.input_shape)),
                "featkd_num_classes": str(built.data.num_classes)}
    result = export_student(built.student, batch, args.format, out, fresh_model=fresh_model, metadata=metadata)
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({size:.2f} MB, {args.format}) from {weights}")
    print(result.describe(batch.shape[0]))
    if result.max_abs_diff is not None and result.max_abs_diff > args.atol:
        raise FeatkdError(f"{out}: max abs difference {result.max_abs_diff:.3g} is above --atol {args.atol:g}; "
                          "the exported model does not reproduce the PyTorch student")
    return 0
