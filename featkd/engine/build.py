"""One place where a run is assembled: :func:`build_run` turns a validated config into a :class:`Run`.

``featkd train`` (through :class:`~featkd.engine.trainer.Trainer`), ``eval``, ``match``, ``search``,
``kernel``, ``bench`` and the benchmarks all call it, so the data, the task, both models, the typed method
options, the distiller and the captures are built (and checked) the same way everywhere. Everything that
can fail on bad input fails here, before anything is written. The order of construction is fixed (data,
teacher, student, distiller), because each draws from the seeded RNG: the same config gives the same
initial weights. Its method half, :func:`method_options` and :func:`build_distiller`, is what the plain-loop
API (:class:`featkd.api.Distillation`) calls with the user's own models.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from featkd.capture.capture import CapturingModel
from featkd.capture.points import expand_entry_pairs
from featkd.config import ExperimentConfig, ModelConfig, amp_mode, from_dict
from featkd.data import DataBundle, build_data
from featkd.distributed import DistInfo, init_distributed
from featkd.engine import checkpoint as ckpt
from featkd.errors import ConfigError, FeatkdError
from featkd.methods import METHODS
from featkd.methods.base import BuildContext, Distiller, DistillerConfig, RunContext
from featkd.models import create_model
from featkd.models.zoo import resolve_weights
from featkd.modes import eval_mode, probe_output
from featkd.tasks import Task, task_for

#: device types on which ``train.sync_batchnorm`` converts BatchNorm to SyncBatchNorm (torch's SyncBatchNorm
#: refuses other inputs in training under a process group; on the CPU each rank keeps its own statistics)
SYNC_BATCHNORM_DEVICES = ("cuda",)

#: autocast dtype -> its name in train.amp (None: off)
AMP_NAMES: dict[torch.dtype | None, str] = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "none"}


@dataclass
class Run:
    """A built run: everything a step, an evaluation or a method's tool needs. Models are on ``device``."""

    cfg: ExperimentConfig
    dist: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None  # the autocast dtype (train.amp), None: off
    data: DataBundle
    task: Task
    method_cls: type[Distiller]
    options: DistillerConfig  # the method's typed options, parsed once
    teacher: nn.Module | None
    student: nn.Module
    distiller: Distiller
    teacher_capture: CapturingModel | None
    student_capture: CapturingModel
    log: Callable[[str], None] = print
    #: "reason" lines of the bad files the evaluation loaders skipped (data.bad_files: skip), not yet written
    skipped_files: list[str] = field(default_factory=list)

    @property
    def amp(self) -> bool:
        """Whether the run autocasts (bf16 or fp16)."""
        return self.amp_dtype is not None

    @property
    def amp_name(self) -> str:
        """``bf16`` | ``fp16`` | ``none``: the autocast of the run, as the teacher cache's key and the log name it."""
        return AMP_NAMES[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's dtype (``train.amp``: bf16 or fp16), else nothing."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare_input(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        """A batch as the models expect it (channels-last when ``train.channels_last``); a list of images of
        different sizes (streamed detection batches) as it is."""
        if self.cfg.train.channels_last and isinstance(x, Tensor) and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def context(self, *, steps_per_epoch: int = 0, resumed: bool = False,
                out_dir: Path | None = None) -> RunContext:
        """The :class:`RunContext` handed to the distiller's life-cycle hooks."""
        return RunContext(
            teacher=self.teacher, student=self.student, teacher_capture=self.teacher_capture,
            student_capture=self.student_capture, data=self.data, device=self.device, dist=self.dist,
            epochs=self.cfg.train.epochs, steps_per_epoch=steps_per_epoch, resumed=resumed,
            out_dir=out_dir if self.dist.is_main else None, autocast=self.autocast, log=self.log,
            eval_batch_size=self.cfg.data.eval_batch_size, seed=self.cfg.train.seed, task=self.task,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, Any]:
        """The task's metrics of ``model`` on ``split`` (test | val | train: the eval view), summed over ranks.

        Raises :class:`FeatkdError` for ``val`` when the config holds out no validation split.
        """
        kw = {"rank": self.dist.rank, "world_size": self.dist.world_size, "device": self.device}
        bs = self.cfg.data.eval_batch_size
        custom = self.task.evaluate(model, split, batch_size=self.cfg.data.eval_batch_size, dist=self.dist,
                                    device=self.device, autocast=self.autocast)
        if custom is not None:  # the task scores on other data (a label-free run's probe set)
            return custom
        loader = {"test": self.data.test_loader, "val": self.data.val_loader,
                  "train": self.data.train_eval_loader}[split](bs, **kw)
        if loader is None:
            raise FeatkdError("split val: this config has no validation split (data.val_fraction is 0)")
        evaluator = self.task.evaluator(self.device)
        with eval_mode(model):
            for x, y in loader:
                with self.autocast():
                    output = self.task.predict(model, self.prepare_input(x))
                evaluator.update(self.task.logits(output), y)
        self.skipped_files.extend(getattr(loader, "skipped", ()))
        evaluator.reduce(self.dist)  # every rank: sums all-reduced, or (detection) predictions gathered
        return evaluator.result()


def build_model(spec: ModelConfig, data: DataBundle, role: str) -> nn.Module:
    """Create a registry model sized for ``data`` and load its checkpoint if one is given."""
    for key in ("num_classes", "in_channels"):
        if key in spec.options:
            raise ConfigError(f"{role}.options.{key}: set from the data set ({data.name}); remove the option")
    model = create_model(spec.model, num_classes=data.num_classes, in_channels=data.input_shape[0],
                         **spec.options)
    if spec.checkpoint:
        ckpt.load_model_weights(model, resolve_weights(spec.checkpoint), what=f"{role}.checkpoint")
    return model


def build_teacher(cfg: ExperimentConfig, data: DataBundle, device: torch.device, example: Tensor, task: Task,
                  log: Callable[[str], None]) -> nn.Module:
    """The frozen teacher of ``cfg``: ``teacher:`` built as any model, or ``teachers:`` as a
    :class:`~featkd.models.ensemble.TeacherEnsemble` of its members (each with its own input view)."""
    if not cfg.teachers:
        if not cfg.teacher.checkpoint:
            log("warning: teacher.checkpoint is empty: distilling from an untrained teacher")
        teacher = build_model(cfg.teacher, data, "teacher").to(device).eval()
    else:
        from featkd.models.ensemble import TeacherEnsemble, input_channels, member_view

        members, views = {}, {}
        for name, spec in cfg.teachers.items():
            role = f"teachers.{name}"
            if not spec.checkpoint:
                log(f"warning: {role}.checkpoint is empty: distilling from an untrained teacher")
            options = dict(spec.options)
            kw = {"num_classes": options.pop("num_classes", data.num_classes),
                  "in_channels": options.pop("in_channels", data.input_shape[0])}
            model = create_model(spec.model, **kw, **options)
            if spec.checkpoint:
                ckpt.load_model_weights(model, resolve_weights(spec.checkpoint), what=f"{role}.checkpoint")
            members[name] = model
            views[name] = member_view(name, spec.input_size, spec.mean, spec.std,
                                      input_channels(model) or kw["in_channels"])
        teacher = TeacherEnsemble(members, views, data.mean or (0.0,) * data.input_shape[0],
                                  data.std or (1.0,) * data.input_shape[0]).to(device).eval()
    teacher.requires_grad_(False)
    output = probe_output(teacher, example, f"teacher {cfg.teacher_label!r}")
    if not cfg.teachers:  # an ensemble's first member may be any encoder: its output is a classifier's only for KD
        task.check_output(output, "teacher", cfg.teacher.model, data.name)
    return teacher


def _check_method_task(method_cls: type[Distiller], name: str, task: Task) -> None:
    if method_cls.tasks is not None and task.name not in method_cls.tasks:
        usable = sorted(m for m in METHODS if METHODS.get(m).tasks is None or task.name in METHODS.get(m).tasks)
        raise ConfigError(f"method.name: {name!r} is defined for {', '.join(method_cls.tasks)} only "
                          f"({method_cls.task_reason}); for {task.name} use one of: {', '.join(usable)}")


def method_options(name: str, options: Mapping[str, Any], task: Task) -> tuple[type[Distiller], DistillerConfig]:
    """The class of method ``name`` and its typed options (checked key by key, errors name ``method.KEY``),
    after checking that the method is defined for ``task``."""
    method_cls = METHODS.get(name)
    typed = from_dict(method_cls.Config, options, "method")
    _check_method_task(method_cls, name, task)
    if not task.logit_kd and getattr(typed, "kd_weight", 0.0):
        raise ConfigError(f"method.kd_weight: {task.name} has no logit-level KD term; set it to 0 and distil "
                          "features (the method's pairs)")
    return method_cls, typed


def build_distiller(
    method_cls: type[Distiller], options: DistillerConfig, teacher: nn.Module | None, student: nn.Module,
    example: Tensor, num_classes: int, task: Task, train_size: int | None = None,
) -> tuple[Distiller, CapturingModel, CapturingModel | None]:
    """The distiller (on ``example``'s device) and the student's and teacher's captures of its points.

    ``example`` is a batch (B >= 2) of the input shape; the models must already be on its device.
    ``train_size``: samples in the training split (for methods with a per-sample memory), if known.
    """
    input_shape = tuple(example.shape[1:])
    qualify = getattr(teacher, "qualify", None)  # a TeacherEnsemble: `dino:blocks.11` -> `dino.blocks.11`
    if qualify is not None and isinstance(getattr(options, "pairs", None), list):
        options = replace(options, pairs=[[p[0], qualify(p[1]), *p[2:]] if isinstance(p, list) and len(p) >= 2
                                          else p for p in options.pairs])
    if teacher is not None and isinstance(getattr(options, "pairs", None), list):  # [m[*], m[*]]: levels by stride
        options = replace(options, pairs=expand_entry_pairs(options.pairs, teacher, student, example))
    build_ctx = BuildContext(teacher, student, input_shape, num_classes, example.device, task,  # type: ignore[arg-type]
                             train_size=train_size)
    distiller = method_cls(options, build_ctx).to(example.device)
    student_capture = CapturingModel(student, distiller.student_points, example)
    teacher_capture = (CapturingModel(teacher, distiller.teacher_points, example)
                       if teacher is not None else None)
    return distiller, student_capture, teacher_capture


def configure_process(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """Threads, determinism and cuDNN settings of this process; returns the autocast dtype (None: off).

    ``train.amp: fp16`` is taken on the CPU too: torch's CPU autocast runs float16 (slowly; useful to check a
    recipe before it goes to a GPU), and the trainer's GradScaler works there as well."""
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = device.type == "cuda"
    mode = amp_mode(tc.amp)
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def seed_student_init(seed: int) -> None:
    """Seed again just before the student is built. The teacher's random init (before its checkpoint is
    loaded) draws from the same RNG, so without this ``none`` (no teacher) would start from other weights than
    every distillation method with the same seed; so one seed is one initial student for every method
    (``featkd bench``'s paired columns rely on it)."""
    ckpt.seed_everything(seed)


def build_run(cfg: ExperimentConfig, log: Callable[[str], None] = print, *,
              student_checkpoint: str | Path | None = None) -> Run:
    """Assemble ``cfg`` (see the module docstring). Under ``torchrun`` this joins the process group.

    ``student_checkpoint`` replaces ``cfg.student.checkpoint`` (tools that evaluate a trained student).
    """
    tc = cfg.train
    dist, device = init_distributed(tc.device)
    log = log if dist.is_main else (lambda _msg: None)
    amp_dtype = configure_process(cfg, device)
    ckpt.seed_everything(tc.seed)  # same initial weights on every rank (DDP broadcasts them anyway)

    data = build_data(cfg.data)
    task = task_for(data)
    method_cls, options = method_options(cfg.method_name, cfg.method_options(), task)
    example = torch.zeros(2, *data.input_shape, device=device)
    teacher = None
    if method_cls.needs_teacher:
        if not cfg.has_teacher:
            raise ConfigError(f"teacher: method {cfg.method_name!r} needs a teacher section (or teachers:)")
        teacher = build_teacher(cfg, data, device, example, task, log)
    student_spec = cfg.student if student_checkpoint is None else replace(cfg.student,
                                                                          checkpoint=str(student_checkpoint))
    seed_student_init(tc.seed)
    student = build_model(student_spec, data, "student").to(device)
    task.check_output(probe_output(student, example, f"student {cfg.student.model!r}"), "student",
                      cfg.student.model, data.name)
    if cfg.data.resize_short is not None:  # the data resizes each image: a detector's own resize would redo it
        from featkd.models.detection import keep_input_size

        kept = [role for role, model in (("teacher", teacher), ("student", student))
                if model is not None and keep_input_size(model)]
        if kept:
            log(f"data.resize_short resizes the images: the {' and '.join(kept)}'s own min_size resize is off")
    task.check_models(teacher, student, cfg.teacher_label or "", cfg.student.model, data.name)
    sync_bn = tc.sync_batchnorm and dist.enabled
    if sync_bn and device.type not in SYNC_BATCHNORM_DEVICES:
        log("train.sync_batchnorm needs CUDA; keeping per-rank BatchNorm statistics on CPU")
        sync_bn = False
    if sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if tc.channels_last:
        for model in (teacher, student):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    distiller, student_capture, teacher_capture = build_distiller(method_cls, options, teacher, student, example,
                                                                  data.num_classes, task, data.train_size)
    if not data.labelled and distiller.class_targets:
        raise ConfigError(f"method.name: {cfg.method_name!r} (with these options) reads the targets as class ids, but "
                          "this run is label-free (data.labels: ignore / dataset: unlabelled); use a feature method "
                          "(multiteacher, fitnets, cwt, mgd, ...) or kd")
    if data.soft_targets and distiller.class_targets:
        raise ConfigError(f"data.mixup_alpha / cutmix_alpha: method {cfg.method_name!r} (with these options) reads "
                          "the targets as class ids, but mixed batches have soft targets; set both to 0")
    if sync_bn:  # the distiller's own BatchNorms (norms, connectors) sit in the module DDP wraps: sync them too
        distiller = nn.SyncBatchNorm.convert_sync_batchnorm(distiller)
    return Run(cfg=cfg, dist=dist, device=device, amp_dtype=amp_dtype, data=data, task=task, method_cls=method_cls,
               options=options, teacher=teacher, student=student, distiller=distiller,
               teacher_capture=teacher_capture, student_capture=student_capture, log=log)
