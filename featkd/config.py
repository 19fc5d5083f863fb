"""Experiment configuration: typed dataclasses, built from YAML with every key checked.

A config file holds the sections ``data``, ``teacher``, ``student``, ``method``, ``optim`` and ``train``
(see ``configs/`` for complete examples); ``base: other.yaml`` merges the file over another one, so a family
of experiments shares one protocol file. ``--set key.sub=value`` overrides (values parsed as YAML) are
applied to the raw mapping before validation, so they are checked exactly like the file. Errors name the
offending key and, for enumerations, the allowed values: ``method.temprature: unknown key (allowed: ...)``.
Values are range-checked as well, section by section (each dataclass's ``validate``, called by :func:`from_dict`;
checks across sections in :meth:`ExperimentConfig.validate`), before anything runs or is written:
``train.eval_every: must be a positive integer, got 0``.

The ``method`` section is validated against the options dataclass of the chosen method
(``featkd.methods``), so every method documents its own options in one place.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from featkd.data import DataConfig
from featkd.errors import ConfigError, did_you_mean
from featkd.resources import missing_config_hint

T = TypeVar("T")


@dataclass
class ModelConfig:
    """A network: registry name, constructor options and optional weights to load."""

    model: str = "resnet8"  # a featkd model, torchvision:<name>, or package.module:callable (featkd.models.user)
    options: dict[str, Any] = field(default_factory=dict)
    # a run folder, student.pt / last.pt, a plain state_dict, a .safetensors file, or "zoo:NAME"
    checkpoint: str | None = None


@dataclass
class TeacherSpec(ModelConfig):
    """One member of ``teachers:`` (a :class:`~featkd.models.ensemble.TeacherEnsemble`): a model as under
    ``teacher:`` plus the input it wants. The ensemble undoes the data's normalisation and gives each member its
    own view of the batch: resized (bilinear) to ``input_size`` and normalised with ``mean`` / ``std``. null keeps
    the data's size / normalisation. Unlike ``teacher:``, ``options`` may set ``num_classes`` / ``in_channels``
    (a teacher trained on other data: a 1000-class head, RGB input; a grey batch is repeated to 3 channels)."""

    input_size: int | list[int] | None = None  # int: square; [H, W]
    mean: list[float] | None = None  # per input channel of the member, on [0, 1] pixels
    std: list[float] | None = None

    def validate(self, path: str = "teachers.NAME") -> None:
        size = self.input_size
        ok = size is None or (isinstance(size, int) and size >= 1) or (
            isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 1 for v in size))
        if not ok:
            raise ConfigError(f"{path}.input_size: must be null, a positive integer or [H, W], got {size!r}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError(f"{path}.mean / std: give both or neither")
        if self.mean is not None and (len(self.mean) != len(self.std) or not all(s > 0 for s in self.std)):
            raise ConfigError(f"{path}.std: must have one positive value per channel of mean, got {self.std!r}")


#: names a teacher of ``teachers:`` may not take: the ensemble's own attributes (``nn.Module``'s included)
RESERVED_TEACHER_NAMES = ("member_names", "views", "data_mean", "data_std", "input_shapes", "member", "qualify",
                          "member_of", "view_of")


def check_teacher_name(name: str, path: str = "teachers") -> None:
    """A ``teachers:`` name is a Python identifier (capture points are ``NAME.module``) that is no attribute of
    ``nn.Module``; a one-line ConfigError otherwise."""
    import keyword

    from torch import nn  # local: the config needs torch only here

    if not (isinstance(name, str) and name.isidentifier()) or keyword.iskeyword(name) or name.startswith("_"):
        raise ConfigError(f"{path}.{name}: a teacher's name must be an identifier such as dino or cnn "
                          "(its capture points are NAME.module)")
    if hasattr(nn.Module, name) or name in RESERVED_TEACHER_NAMES:
        raise ConfigError(f"{path}.{name}: {name!r} is reserved (an attribute of the ensemble module); rename it")


#: torch.optim classes the trainer cannot drive (it calls ``step()`` without a closure, on dense gradients), and why
_UNDRIVABLE_OPTIMIZERS = {"LBFGS": "it needs a closure that re-runs the forward",
                          "SparseAdam": "it takes sparse gradients only"}


def optimizer_class(name: str, path: str = "optim.optimizer") -> type:
    """The ``torch.optim`` class named ``name``, case-insensitively (``sgd``, ``adamw``, ``Adam``, ``rmsprop``,
    ``NAdam``); a one-line ConfigError naming the choices otherwise."""
    import torch.optim  # local: only the optimiser's name needs torch here

    classes = {n.lower(): c for n in dir(torch.optim) if isinstance(c := getattr(torch.optim, n), type)
               and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}
    cls = classes.get(name.lower())
    if cls is None:
        names = sorted(c.__name__ for c in classes.values())
        raise ConfigError(f"{path}: {name!r} is not a torch.optim optimiser{did_you_mean(name, names)} "
                          f"(allowed: {', '.join(names)})")
    if cls.__name__ in _UNDRIVABLE_OPTIMIZERS:
        raise ConfigError(f"{path}: {cls.__name__} cannot be used here: {_UNDRIVABLE_OPTIMIZERS[cls.__name__]}")
    return cls


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (the schedule is stepped every optimiser step)."""

    # sgd | adamw, or any torch.optim class by name (Adam, RMSprop, NAdam, ...; case-insensitive); every optimiser
    # gets lr and weight_decay from here, SGD momentum and nesterov too, anything else through `options`
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9  # SGD only (other optimisers: options, e.g. RMSprop {momentum: 0.9})
    nesterov: bool = True  # SGD only
    weight_decay: float = 5e-4
    options: dict[str, Any] = field(default_factory=dict)  # more keyword arguments of the optimiser, e.g.
    # {betas: [0.9, 0.99], eps: 1.0e-8} for Adam (lists become tuples); names checked against its signature
    schedule: Literal["cosine", "step", "constant", "poly"] = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # "step": epochs (>= 1) or fractions
    gamma: float = 0.1  # "step": factor at each milestone
    warmup_epochs: float = 0.0  # linear warm-up from lr/100, in epochs (fractions allowed)
    min_lr: float = 0.0  # "cosine", "poly": final learning rate
    power: float = 0.9  # "poly": lr x (1 - progress)^power (mmseg / torchvision segmentation: 0.9)
    grad_clip: float | None = None  # max global L2 norm of the gradients, None = off

    def validate(self, path: str = "optim") -> None:
        """Check the values on their own (the config loader calls this); one-line ConfigError naming the key.
        Checks against ``train.epochs`` are in :func:`check_schedule`."""
        _check(self, path, [
            (self.lr > 0, "lr", "> 0"),
            (0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.gamma > 0, "gamma", "> 0"),
            (self.power > 0, "power", "> 0"),
            (self.warmup_epochs >= 0, "warmup_epochs", ">= 0"),
            (0.0 <= self.min_lr <= self.lr, "min_lr", f"in [0, optim.lr = {self.lr:g}]"),
            (self.grad_clip is None or self.grad_clip >= 0, "grad_clip", "null or >= 0 (0: off)"),
            (all(m > 0 for m in self.milestones), "milestones",
             "positive: fractions of the run (< 1) or epochs (>= 1)"),
        ])
        self.optimizer_kwargs(path)  # the name and the option names (their values: when the optimiser is built)

    def optimizer_kwargs(self, path: str = "optim") -> dict[str, Any]:
        """The keyword arguments of :func:`optimizer_class` ``(self.optimizer)`` besides the parameter groups;
        one-line ConfigError for an option the optimiser does not take (naming the ones it does)."""
        import inspect

        cls = optimizer_class(self.optimizer, f"{path}.optimizer")
        accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")]
        kwargs: dict[str, Any] = {"lr": self.lr}
        own = {"lr", "weight_decay"}
        if "weight_decay" in accepted:
            kwargs["weight_decay"] = self.weight_decay
        elif self.weight_decay:
            raise ConfigError(f"{path}.weight_decay: {cls.__name__} takes no weight decay; set it to 0")
        if cls.__name__ == "SGD":  # the section's momentum / nesterov keys are SGD's (as before: sgd | adamw)
            kwargs.update(momentum=self.momentum, nesterov=self.nesterov and self.momentum > 0)
            own |= {"momentum", "nesterov"}
        for key, value in self.options.items():
            if key in own:
                raise ConfigError(f"{path}.options.{key}: set {path}.{key} instead")
            if key not in accepted:
                rest = [n for n in accepted if n not in own]
                raise ConfigError(f"{path}.options.{key}: {cls.__name__} takes no argument {key!r}"
                                  f"{did_you_mean(str(key), rest)} (it takes: {', '.join(rest)})")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return kwargs


@dataclass
class WandbConfig:
    """``train.wandb``: the epoch records also go to Weights & Biases (rank 0; ``pip install wandb``)."""

    project: str | None = None  # null: wandb's default project
    name: str | None = None  # the run's display name (null: the run folder's name)
    entity: str | None = None  # team or user (null: wandb's default)
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None  # null: wandb's own default (WANDB_MODE)


def amp_mode(amp: str | bool) -> str:
    """``train.amp`` as one of auto | bf16 | fp16 | none (YAML's true reads as bf16, false / off as none)."""
    if isinstance(amp, bool):
        return "bf16" if amp else "none"
    return amp


@dataclass
class TrainConfig:
    """Everything about running the loop itself."""

    epochs: int = 30
    stop_after: int | None = None  # stop after this many epochs (the schedule still spans `epochs`); resume later
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun each rank takes cuda:LOCAL_RANK)
    # autocast: auto = bf16 on CUDA (where the GPU has it), none on the CPU; bf16; fp16 = float16 with gradient
    # scaling (torch.amp.GradScaler; CUDA, and the CPU, where torch's CPU autocast runs it, slowly: for checks);
    # none. YAML's true reads as bf16, false / off as none
    amp: Literal["auto", "bf16", "fp16", "none"] | bool = "auto"
    # the optimiser steps every N micro-batches of data.batch_size (the global batch of one forward): an effective
    # batch of N x data.batch_size; the losses are divided by N, the LR schedule, checkpoint_every_steps and the
    # method's on_step_end count optimiser steps; under DDP the gradients are all-reduced once per optimiser step
    accumulate: int = 1
    deterministic: bool = False  # torch.use_deterministic_algorithms + no cuDNN benchmarking
    num_threads: int | None = None  # torch CPU threads per process (None = torch's default)
    sync_batchnorm: bool = False  # the student's and the distiller's BatchNorms -> SyncBatchNorm under DDP (CUDA only)
    find_unused_parameters: bool = False  # DDP option, for methods with parameters unused in some steps
    eval_every: int = 1  # evaluate on the test split every N epochs (and always after the last)
    # also write last.pt every N optimiser steps inside an epoch (0: at epoch ends only); resume continues there
    checkpoint_every_steps: int = 0
    # tqdm bars on rank 0 (auto: when stderr is a terminal); YAML's bare on/off read as true/false, both accepted
    progress: Literal["auto", "on", "off"] | bool = "auto"
    # where no bars are shown (stdout in a log file, a cluster job): a line with step, images/s, loss and the ETA of
    # the epoch and of the run every N seconds (rank 0); 0: off, the epoch lines only
    log_every_s: float = 30.0
    tensorboard: bool = True  # write TensorBoard scalars when the tensorboard package is installed
    # {project: ..., name: ...}: rank 0 also sends the epoch records of a run with a folder (--out) to Weights &
    # Biases (imported only then: pip install wandb; a resume continues the W&B run); null: off
    wandb: WandbConfig | None = None
    save_best: bool = True  # keep best.pt, by validation accuracy if data.val_fraction > 0 else test accuracy
    channels_last: bool = False  # models and 4-D input batches in torch.channels_last memory format (GPU speed)
    compile: bool = False  # torch.compile the student's and the teacher's forward (results unchanged)
    # a folder (e.g. ~/.cache/featkd/teacher) for the teacher's per-step training outputs: the first run of a
    # stream (teacher, data, seed, world size, ...) writes them, later runs read them instead of running the
    # teacher, with results unchanged (featkd/engine/teacher_cache.py); null: off
    teacher_cache: str | None = None
    teacher_cache_max_gb: float = 10.0  # at most this much per stream on disk; epochs beyond it run the teacher
    # the teacher's test evaluation before training: auto = once per (teacher weights, evaluation data), remembered
    # in the run folder and in $FEATKD_CACHE/teacher-evals (featkd/engine/teacher_eval.py); always; off
    teacher_eval: Literal["auto", "always", "off"] = "auto"

    def validate(self, path: str = "train") -> None:
        """Check the values (the config loader calls this); one-line ConfigError naming the key."""
        _check(self, path, [
            (self.epochs >= 1, "epochs", "a positive integer"),
            (self.stop_after is None or self.stop_after >= 1, "stop_after", "null or a positive integer"),
            (self.seed >= 0, "seed", ">= 0"),
            (self.num_threads is None or self.num_threads >= 1, "num_threads", "null or a positive integer"),
            (self.eval_every >= 1, "eval_every", "a positive integer"),
            (self.accumulate >= 1, "accumulate", "a positive integer (micro-batches per optimiser step)"),
            (self.checkpoint_every_steps >= 0, "checkpoint_every_steps", ">= 0 (0: at epoch ends only)"),
            (self.teacher_cache_max_gb >= 0, "teacher_cache_max_gb", ">= 0"),
            (self.log_every_s >= 0, "log_every_s", ">= 0 (0: off)"),
        ])


def _check(obj: Any, path: str, checks: list[tuple[bool, str, str]]) -> None:
    """Raise a one-line ConfigError for the first failed ``(ok, key, what it must be)`` check."""
    for ok, key, want in checks:
        if not ok:
            raise ConfigError(f"{path}.{key}: must be {want}, got {getattr(obj, key)!r}")


def check_schedule(optim: OptimConfig, epochs: int) -> None:
    """The checks of ``optim`` that depend on the run's length ``train.epochs``: for the ``step`` schedule, the
    milestones increase and fall inside it. A warm-up as long as the run or longer is no error: the schedule
    shortens it (:func:`featkd.engine.schedule.fitted_warmup`), so a short trial run of a long recipe works."""
    if optim.schedule != "step":
        return
    at = [m * epochs if m < 1 else m for m in optim.milestones]  # in epochs
    for i, (m, e) in enumerate(zip(optim.milestones, at, strict=True)):
        if e >= epochs:
            raise ConfigError(f"optim.milestones[{i}]: {m:g} is not inside the run ({epochs} epochs); use a "
                              f"fraction < 1 or an epoch < {epochs}, or raise train.epochs")
        if i and e <= at[i - 1]:
            raise ConfigError(f"optim.milestones: must increase, got {optim.milestones!r} "
                              f"(epochs {', '.join(f'{a:g}' for a in at)})")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig | None = None
    # several teachers: name -> model, options, checkpoint, input_size, mean, std (featkd/models/ensemble.py); its
    # capture points are NAME.module (NAME:module is accepted in method pairs); not together with `teacher:`
    teachers: dict[str, TeacherSpec] | None = None
    student: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", "none"))

    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def has_teacher(self) -> bool:
        """Whether a teacher is configured (``teacher:`` or ``teachers:``)."""
        return self.teacher is not None or bool(self.teachers)

    @property
    def teacher_label(self) -> str | None:
        """The teacher as logs and summaries name it: its model, or ``ensemble(dino=..., cnn=...)``."""
        if self.teachers:
            return "ensemble(" + ", ".join(f"{n}={s.model}" for n, s in self.teachers.items()) + ")"
        return self.teacher.model if self.teacher is not None else None

    def teacher_description(self) -> dict[str, Any]:
        """``{"model": ..., "options": ...}`` of the teacher (cache keys); for ``teachers:`` the model is
        :attr:`teacher_label` and the options every member's model, options and input view."""
        if self.teachers:
            return {"model": self.teacher_label, "options": {
                n: {k: v for k, v in dataclasses.asdict(s).items() if k != "checkpoint"}
                for n, s in self.teachers.items()}}
        return {"model": self.teacher.model, "options": self.teacher.options} if self.teacher else {}

    def validate(self, path: str = "") -> None:
        """Checks across sections (each section checked its own values already)."""
        check_schedule(self.optim, self.train.epochs)
        if self.teachers is not None:
            if self.teacher is not None:
                raise ConfigError("teachers: give `teacher:` (one teacher) or `teachers:` (several), not both")
            if not self.teachers:
                raise ConfigError("teachers: give at least one NAME: {model: ...}")
            for name in self.teachers:
                check_teacher_name(name)


# ---------------------------------------------------------------------------------------------------------
# generic checked conversion of mappings to dataclasses
# ---------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    if dataclasses.is_dataclass(tp):
        return "a mapping of options"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (int -> float, mapping -> dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{path}: {value!r} is not allowed{did_you_mean(str(value), map(str, allowed))} "
                f"(allowed: {', '.join(map(str, allowed))})"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, Mapping) and len(sections) == 1:  # an optional section: its own key errors
            return _convert(value, sections[0], path)
        named = [a for a in args if typing.get_origin(a) is dict and len(typing.get_args(a)) == 2
                 and dataclasses.is_dataclass(typing.get_args(a)[1])]
        if isinstance(value, Mapping) and len(named) == 1:  # optional NAME -> section (teachers:): their key errors
            return _convert(value, named[0], path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of options, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):  # NAME -> section (teachers:)
            return {k: _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and ill-typed values.

    Errors name the full key path, e.g. ``optim.lr: expected a number, got 'fast'``.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{prefix}{key}: unknown key{did_you_mean(str(key), fields)} (allowed: {', '.join(fields)})"
            )
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(path)
    return obj


# ---------------------------------------------------------------------------------------------------------
# YAML and overrides
# ---------------------------------------------------------------------------------------------------------


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading YAML configs needs PyYAML: pip install pyyaml") from None
    return yaml


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.1"`` -> (["optim", "lr"], 0.1); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.1")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = _yaml().safe_load(raw) if raw.strip() else None
    except Exception:  # YAML errors span many types; the raw string is then the value
        value = raw
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``--set`` overrides applied (intermediate mappings are created)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[: i + 1])} is not a section")
            node = nxt
        node[keys[-1]] = value
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():

        where = "" if path.is_absolute() else f" (relative to {Path.cwd()}, the current folder)"
        raise ConfigError(f"config file {str(path)!r} not found{where}{missing_config_hint(path)}")
    try:
        data = _yaml().safe_load(path.read_text())
    except Exception as exc:  # report YAML syntax errors in one line with the file name
        msg = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML ({msg})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in ``override`` replaces ``base``.

    The ``method`` section is replaced whole (options of one method mean nothing to another).
    """
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "method":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file; a top-level ``base: other.yaml`` (relative to the file) is merged underneath."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a loop")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the path of another config file")
    return merge(load_raw(path.parent / base, (*_seen, path.resolve())), data)


def build_config(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping (from YAML + overrides) into an :class:`ExperimentConfig`.

    The ``method`` section is checked against the chosen method's options dataclass.
    """
    cfg = from_dict(ExperimentConfig, raw)
    method = cfg.method if isinstance(cfg.method, dict) else {}
    if "name" not in method:
        raise ConfigError("method.name: required key is missing (e.g. none, kd, fitnets, mgd)")
    from featkd.methods import METHODS  # local: methods import config types

    cls = METHODS.get(str(method["name"]))
    options = from_dict(cls.Config, cfg.method_options(), "method")
    cfg.method = {"name": method["name"], **dataclasses.asdict(options)}
    if cls.needs_teacher and not cfg.has_teacher:
        raise ConfigError(f"teacher: method {method['name']!r} needs a teacher section (or teachers:)")
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``--set`` overrides and validate everything.

    The file's folder is searched for ``model: module:callable`` modules (after the working directory).
    """
    raw = load_raw(path) if path is not None else {}
    if path is not None:
        from featkd.models.user import add_search_dir  # local: featkd.models imports the model files

        add_search_dir(Path(path).parent)
    return build_config(apply_overrides(raw, overrides))


def dump_yaml(cfg: ExperimentConfig) -> str:
    return _yaml().safe_dump(cfg.to_dict(), sort_keys=False)
