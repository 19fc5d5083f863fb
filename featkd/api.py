"""Any featkd method inside your own training loop, without featkd's Trainer: :class:`Distillation`.

::

    kd = Distillation(teacher, student, method="mgd", options={"reducer": "amp"}, example_input=x0,
                      train_loader=stats_loader, epochs=epochs)
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        kd.on_epoch_start(epoch)
        for x, y in train_loader:
            losses = kd(x, y)                     # {"ce": ..., "mgd": ...}: named, weighted terms
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            kd.on_step_end()
        kd.on_epoch_end(epoch)

What is built is what :func:`featkd.engine.build.build_run` builds for a config, from the same two functions:
:func:`~featkd.engine.build.method_options` (the method's typed options, checked key by key, and against the
task) and :func:`~featkd.engine.build.build_distiller` (the distiller and both captures of the unmodified
models). Not built: data, optimiser, schedule, autocast, DDP, checkpoints: those are the loop's.

- ``kd(x, y)`` runs the teacher (eval, no grad) and the student (in whatever mode the loop put it: call
  ``student.train()`` yourself) and returns the distiller's loss terms; the task's logits of the student's
  output in that call (the output itself for a classifier) are kept in ``kd.student_output`` for the loop's
  own metrics.
- ``kd.parameters()`` are the distiller's own (connectors, norms: FitNets, CWT...; none for MGD, KD): give
  them to the optimiser with the student's.
- Hooks, as the Trainer calls them: ``setup()`` once (MGD's first matching, KDA's landmarks; called on the
  first ``kd(x, y)`` if not called before), ``on_epoch_start(epoch)``, ``on_step_end()`` after every
  optimiser step (it counts the steps: MGD's per-step re-matching), ``on_epoch_end(epoch)``.
- ``train_loader``: any iterable of ``(x, y)`` batches, re-iterated whenever a method needs statistics over
  the training data; give it the eval view (no augmentation) where the method computes statistics, and it
  need not be shuffled. Methods that need more of featkd's data set (DFA's search) take ``data=`` a
  :class:`~featkd.data.DataBundle` instead (``featkd.data.build_data``), and say so otherwise.
- The teacher is put in eval mode with ``requires_grad_(False)``; both models must be on one device (the
  distiller is built there). ``kd.state_dict()`` / ``kd.load_state_dict()`` hold the distiller's state (a
  matching, landmarks) for the loop's own checkpoints.
- Several processes (``torchrun``, Accelerate, your own ``init_process_group``): build ``Distillation`` after
  the process group exists; it then reduces the methods' statistics over all ranks (each rank passes its own
  shard as ``train_loader``, or all the same loader: the statistics are means either way). Wrap
  ``kd.module`` (the student's capture + the distiller, one ``nn.Module``; its ``parameters()`` are the
  student's and the distiller's) in DDP, or ``kd.module, optimizer, loader = accelerator.prepare(kd.module,
  optimizer, loader)``; ``kd(x, y)`` runs whatever ``kd.module`` is then. ``examples/own_loop_accelerate.py``
  is the Accelerate version of the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from featkd.capture.capture import CapturingModel
from featkd.data import DataBundle
from featkd.distributed import process_group_info
from featkd.engine.build import build_distiller, method_options
from featkd.engine.step import TrainStep, teacher_outputs
from featkd.errors import FeatkdError
from featkd.methods.base import Distiller, RunContext
from featkd.modes import probe_output
from featkd.tasks import TASKS, Task

__all__ = ["Distillation", "LoaderData"]


class _MissingInLoader(FeatkdError, AttributeError):
    """An attribute of featkd's DataBundle that a plain loader does not offer (an AttributeError too, so
    ``getattr(data, name, default)`` keeps working)."""


class LoaderData:
    """The part of :class:`~featkd.data.DataBundle` the methods' hooks use, over a plain iterable of batches.

    ``train_eval_loader`` re-batches the loader's ``(x, y)`` to the asked batch size, stops after ``limit``
    examples and moves batches to the device; ``rank`` / ``world_size`` / ``seed`` are ignored (one process,
    the loader's own order). ``train_size`` is ``len(loader.dataset)`` when there is one, else counted once.
    """

    def __init__(self, loader: Iterable, num_classes: int, input_shape: tuple[int, ...], task: str) -> None:
        self.loader = loader
        self.name = "your train_loader"
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.task = task
        self._size: int | None = None

    @property
    def train_size(self) -> int:
        if self._size is None:
            dataset = getattr(self.loader, "dataset", None)
            try:
                self._size = len(dataset) if dataset is not None else sum(len(x) for x, _ in self.loader)
            except TypeError:
                self._size = sum(len(x) for x, _ in self.loader)
        return self._size

    def train_eval_loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1, device: Any = "cpu",
                          limit: int | None = None, seed: int = 0) -> Iterable[tuple[Tensor, Tensor]]:
        return _Rebatched(self.loader, batch_size, limit, torch.device(device))

    def describe(self) -> str:
        return f"{self.name}: {self.train_size} training examples"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise _MissingInLoader(
            f"this method needs {name!r} of a featkd data set, which a plain train_loader does not have: pass "
            "data=featkd.data.build_data(DataConfig(...)) to Distillation instead of train_loader")


class _Rebatched:
    def __init__(self, loader: Iterable, batch_size: int, limit: int | None, device: torch.device) -> None:
        self.loader, self.batch_size, self.limit, self.device = loader, batch_size, limit, device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        held = seen = 0
        for x, y in self.loader:
            if self.limit is not None:
                x, y = x[: self.limit - seen], y[: self.limit - seen]
            xs.append(x)
            ys.append(y)
            held += len(x)
            seen += len(x)
            while held >= self.batch_size:
                bx, by = torch.cat(xs), torch.cat(ys)
                yield bx[: self.batch_size].to(self.device), by[: self.batch_size].to(self.device)
                xs, ys = [bx[self.batch_size:]], [by[self.batch_size:]]
                held -= self.batch_size
            if self.limit is not None and seen >= self.limit:
                break
        if held:
            yield torch.cat(xs).to(self.device), torch.cat(ys).to(self.device)


class Distillation:
    """A featkd method for the loop's own use (see the module docstring).

    Args:
        teacher: the trained teacher (None for methods that need none: ``none``); frozen here.
        student: the model being trained, unmodified (captures read its intermediate tensors).
        method: a method name (``featkd.METHODS``: kd, fitnets, at, mgd, cwt, kda, sp, rkd, ...).
        options: the method's options, as under ``method:`` in a config (checked: a typo is one
            :class:`FeatkdError` naming ``method.KEY``).
        example_input: a batch (B >= 2) of the input shape, on the models' device; used to check the capture
            points and to size connectors.
        task: ``"classification"`` (class-id targets), ``"segmentation"`` (masks), or a :class:`Task`.
        num_classes: by default the size of dimension 1 of the student's logits on ``example_input``.
        train_loader / data: what statistics passes iterate (see the module docstring); one or neither.
        epochs / steps_per_epoch: the loop's length, for methods that schedule updates (MGD does not
            re-match after the last epoch); ``steps_per_epoch`` defaults to ``len(train_loader)``.
        train_size: samples in the training split, for methods with one memory row per sample (CRD: pass
            ``indices`` to ``kd(x, y, indices)`` too); defaults to ``data.train_size``.
        log: where methods report (MGD's matching cost); ``print`` by default.
    """

    def __init__(
        self, teacher: nn.Module | None, student: nn.Module, method: str = "kd",
        options: Mapping[str, Any] | None = None, *, example_input: Tensor,
        task: str | Task = "classification", num_classes: int | None = None,
        train_loader: Iterable | None = None, data: DataBundle | None = None, epochs: int = 1,
        steps_per_epoch: int | None = None, eval_batch_size: int = 256, seed: int = 0,
        train_size: int | None = None, log: Callable[[str], None] = print,
    ) -> None:
        if train_loader is not None and data is not None:
            raise FeatkdError("Distillation: pass train_loader or data, not both")
        if example_input.ndim < 2 or example_input.shape[0] < 2:
            raise FeatkdError(f"Distillation: example_input must be a batch of at least 2, got shape "
                              f"{tuple(example_input.shape)}")
        self.teacher, self.student = teacher, student
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        if num_classes is None:
            probe_task = task if isinstance(task, Task) else TASKS.get(task)(1)
            logits = probe_task.logits(probe_output(student, example_input, "student"))
            num_classes = int(logits.shape[1])
        self.task: Task = task if isinstance(task, Task) else TASKS.get(task)(num_classes)
        self.method_cls, self.options = method_options(method, dict(options or {}), self.task)
        if self.method_cls.needs_teacher and teacher is None:
            raise FeatkdError(f"Distillation: method {method!r} needs a teacher")
        for role, model in (("teacher", teacher), ("student", student)):
            if model is not None:
                self.task.check_output(probe_output(model, example_input, role), role, type(model).__name__,
                                       "example_input")
        parts = build_distiller(self.method_cls, self.options, teacher, student, example_input, num_classes,
                                self.task, train_size if train_size is not None else getattr(data, "train_size", None))
        self.distiller: Distiller = parts[0]
        self.student_capture: CapturingModel = parts[1]
        self.teacher_capture: CapturingModel | None = parts[2]
        source: Any = data
        if train_loader is not None:
            source = LoaderData(train_loader, num_classes, tuple(example_input.shape[1:]), self.task.name)
        elif data is None:
            source = _NoData()
        if steps_per_epoch is None:
            try:
                steps_per_epoch = len(train_loader) if train_loader is not None else 0  # type: ignore[arg-type]
            except TypeError:
                steps_per_epoch = 0
        # The module a DDP wrapper (or accelerator.prepare) may replace: student capture + distiller.
        self.module: nn.Module = TrainStep(self.student_capture, self.distiller)
        self.ctx = RunContext(
            teacher=teacher, student=student, teacher_capture=self.teacher_capture,
            student_capture=self.student_capture, data=source, device=example_input.device,
            dist=process_group_info(), epochs=epochs, steps_per_epoch=steps_per_epoch, log=log,
            eval_batch_size=eval_batch_size, seed=seed, task=self.task,
        )
        self.epoch = 0
        self.step = 0  # optimiser steps so far (on_step_end counts them)
        self.student_output: Any = None
        self._set_up = False

    # ---- per batch --------------------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        """The named, weighted loss terms for batch ``(x, y)`` (their sum is the loss to minimise); ``indices``
        (B,): each sample's index in the training split, for methods with a per-sample memory (CRD)."""
        if not self._set_up:
            self.setup()
        t_logits, t_feats = teacher_outputs(self.task, self.teacher_capture, x)
        losses, self.student_output = self.module(x, y, t_logits, t_feats, self.epoch, self.step, indices)
        return losses

    def parameters(self) -> Iterator[nn.Parameter]:
        """The distiller's own trainable parameters (give them to the optimiser with the student's)."""
        return (p for p in self.distiller.parameters() if p.requires_grad)

    # ---- life cycle -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Once before training (MGD's first matching, KDA's landmarks, DFA's search)."""
        self._set_up = True
        self.distiller.setup(self.ctx)

    def on_epoch_start(self, epoch: int) -> None:
        if not self._set_up:
            self.setup()
        self.epoch = epoch
        self.distiller.on_epoch_start(epoch, self.ctx)

    def on_step_end(self) -> None:
        """After each optimiser step: the method's per-step hook, then the step count goes up by one."""
        self.distiller.on_step_end(self.step, self.ctx)
        self.step += 1

    def on_epoch_end(self, epoch: int) -> None:
        self.distiller.on_epoch_end(epoch, self.ctx)

    def metrics(self) -> dict[str, float]:
        """The method's extra numbers (e.g. MGD's matching cost), as the Trainer logs them."""
        return self.distiller.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.distiller.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.distiller.load_state_dict(state)


class _NoData:
    """Stands in for the data when none was given: a method that asks for it gets one clear error."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise _MissingInLoader("this method computes statistics over the training data: pass "
                               "train_loader=... (batches of (x, y), no augmentation) to Distillation")

