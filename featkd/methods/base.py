"""The :class:`Distiller` interface every method implements, and the objects the trainer hands it.

One training step, as the trainer runs it (the trainer knows nothing about any particular method)::

    teacher_logits, teacher_features = teacher(x)          # frozen, eval(), no_grad; skipped if not needed
    student_logits, student_features = student(x)          # CapturingModel of the student
    losses = distiller(Batch(x, y, student_logits, ...))   # {"ce": ..., "kd": ..., "mgd": ...}, weighted
    sum(losses.values()).backward(); optimizer.step()      # student + distiller parameters

The task (``featkd/tasks/``) supplies the task term ``"ce"`` (cross-entropy over classes or pixels) and
the logit-level KD term ``"kd"``; the method adds its own terms in :meth:`Distiller.loss`. Logits are the
task's view of the model output (``task.logits``), so a method sees (B, K) or (B, K, H, W) tensors.

Around it the trainer calls the life-cycle hooks: :meth:`Distiller.setup` once before training (after a
resumed state is loaded), :meth:`on_epoch_start`, :meth:`on_step_end` after every optimiser step and
:meth:`on_epoch_end`, each with a :class:`RunContext` (models, the eval-view loader of the training split,
device, distributed helpers); at each evaluation the trainer adds :meth:`eval_metrics` to the epoch's record.
The distiller is an ``nn.Module``: its parameters join the optimiser, its
parameters, buffers and ``get_extra_state`` go into every checkpoint, and none of it is part of the exported
student.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from featkd.capture.capture import CapturingModel
from featkd.distributed import DistInfo
from featkd.errors import FeatkdError
from featkd.modes import eval_mode
from featkd.tasks import ClassificationTask, Task
from featkd.tasks.classification import hinton_kd_loss  # noqa: F401  (public here since 0.1)

if TYPE_CHECKING:
    from featkd.data import DataBundle, Loader


#: Field metadata of a method option counted in training epochs (a warm-up, a re-matching period): a protocol
#: that shortens the schedule scales these with it (:func:`epoch_count_options`). ``("unit_field", "epoch")``:
#: only when that other option says the count is in epochs.
EPOCH_COUNT = {"epoch_count": True}


def epoch_count_options(config: Any) -> list[str]:
    """The names of ``config``'s options that count training epochs (see :data:`EPOCH_COUNT`)."""
    names = []
    for f in dataclasses.fields(config):
        rule = f.metadata.get("epoch_count")
        if rule is True or (isinstance(rule, tuple) and getattr(config, rule[0]) == rule[1]):
            names.append(f.name)
    return names


def scaled_epoch_count(value: int, factor: float) -> int:
    """``value`` epochs of a schedule shortened (or lengthened) by ``factor``: rounded, and a count that was
    on (>= 1) stays >= 1, so a shortened warm-up or period never becomes "off"."""
    return 0 if value <= 0 else max(1, round(value * factor))


@dataclass
class DistillerConfig:
    """Options every method has: the task loss weight and an optional Hinton KD term.

    The Hinton term is ``kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))`` (batch mean), T =
    ``kd_temperature``. With ``kd_weight = 0`` it is not computed.
    """

    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 4.0


@dataclass
class Batch:
    """One training batch with both networks' outputs.

    Shapes: ``inputs`` (B, C, H, W); ``targets`` (B,) class ids, (B, K) class probabilities (mixup / cutmix
    training batches), (B, H, W) masks, or (detection) a list of B dicts (``boxes`` (N, 4), ``labels`` (N,), ...);
    logits (B, K) or (B, K, H, W) (the task's view of
    the output; None for detection); features as captured (e.g. (B, C_i, H_i, W_i)).
    ``teacher_logits`` is None when the method needs no teacher or the task has no logits.
    ``task_losses``: the student's own loss terms when the model computes them (a detector in train mode;
    see ``Task.forward_student``), else None.
    """

    inputs: Tensor
    targets: Any
    student_logits: Any
    student_features: dict[str, Tensor]
    teacher_logits: Tensor | None = None
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    epoch: int = 0
    # global training step (0-based): the optimiser step, or with train.accumulate N > 1 the micro-batch (N per
    # optimiser step), so per-step draws (CRD's negatives) differ between the micro-batches of one update
    step: int = 0
    task_losses: dict[str, Tensor] | None = None
    #: (B,) int64: each sample's index in the training split (0 .. train_size - 1), on the inputs' device;
    #: set only for methods with ``needs_indices`` (a per-sample memory: CRD), else None
    indices: Tensor | None = None


@dataclass
class BuildContext:
    """What a distiller may look at while it is built: the models (weights loaded) and their shapes."""

    teacher: nn.Module | None
    student: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    task: Task | None = None  # None: classification (methods built by hand in tests and scripts)
    train_size: int | None = None  # samples in the training split (a per-sample memory's rows); None: unknown

    def feature_shapes(self, role: str, points: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        """Per-example shapes of capture ``points`` of the ``"teacher"`` or ``"student"`` network."""
        model = self.teacher if role == "teacher" else self.student
        if model is None:
            raise FeatkdError(f"this method needs a {role}")
        example = torch.zeros(2, *self.input_shape, device=self.device)
        return CapturingModel(model, points, example).shapes


@dataclass
class RunContext:
    """What the life-cycle hooks get. Models are the raw ones (not DDP-wrapped, weights shared)."""

    teacher: nn.Module | None
    student: nn.Module
    teacher_capture: CapturingModel | None
    student_capture: CapturingModel
    data: DataBundle
    device: torch.device
    dist: DistInfo
    epochs: int
    steps_per_epoch: int
    resumed: bool = False
    out_dir: Path | None = None  # None on ranks other than 0 and for runs that write nothing
    autocast: Callable[[], AbstractContextManager] = nullcontext
    log: Callable[[str], None] = print
    eval_batch_size: int = 512
    seed: int = 0
    task: Task | None = None  # None: classification (contexts built by hand in tests and scripts)

    def train_eval_loader(self, limit: int | None = None, batch_size: int | None = None,
                          seed: int | None = None) -> Loader:
        """The training split with eval transforms, this rank's shard; ``limit``: a subset drawn with ``seed``
        (default: the run's seed), the same on every rank (each rank then takes its shard of it)."""
        return self.data.train_eval_loader(
            batch_size or self.eval_batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
            device=self.device, limit=limit, seed=self.seed if seed is None else seed,
        )

    def test_loader(self, batch_size: int | None = None) -> Loader:
        """The test split (eval transform), this rank's shard."""
        return self.data.test_loader(batch_size or self.eval_batch_size, rank=self.dist.rank,
                                     world_size=self.dist.world_size, device=self.device)

    @torch.no_grad()
    def iter_features(self, loader: Loader) -> Iterator[tuple[Tensor, Tensor, Any, Any]]:
        """Run both captures in eval mode over ``loader``; yields ``(x, y, teacher_out, student_out)``.

        Each ``*_out`` is ``(logits or None, {point: tensor})``, from the task's frozen-model forward
        (:meth:`~featkd.tasks.base.Task.forward_teacher`: a detector runs only its transform and backbone when
        every point lies there, not its heads and post-processing). The student's train/eval mode is restored.
        """
        forward = (self.task or ClassificationTask(1)).forward_teacher
        with eval_mode(self.student):
            for x, y in loader:
                with self.autocast():
                    t_out = forward(self.teacher_capture, x) if self.teacher_capture is not None else None
                    s_out = forward(self.student_capture, x)
                yield x, y, t_out, s_out


class Distiller(nn.Module):
    """Base class of every method: one file per method under ``featkd/methods/``.

    A subclass sets ``Config`` (a dataclass of its options, usually extending :class:`DistillerConfig`),
    ``needs_teacher``, and in ``__init__`` the capture points ``teacher_points`` / ``student_points`` it
    wants; it overrides :meth:`loss` (the method's own terms) and whichever hooks it needs.
    :meth:`forward` adds the task and optional Hinton terms, so every method offers "+ KD" the same way.
    """

    Config: ClassVar[type] = DistillerConfig
    needs_teacher: ClassVar[bool] = True
    #: buffers that legitimately differ between DDP ranks (e.g. per-rank running sums that the method
    #: all-reduces itself); DDP must not overwrite them with rank 0's copy.
    rank_local_buffers: ClassVar[tuple[str, ...]] = ()
    #: buffers the method itself keeps identical on every rank (a memory bank updated from all-gathered
    #: batches); DDP need not broadcast them from rank 0 before every forward
    self_synced_buffers: ClassVar[tuple[str, ...]] = ()
    #: the method reads ``Batch.indices`` (training-split index of each sample): the trainer passes the
    #: train loader's ``batch_indices`` (every classification loader, in memory or streamed, records them)
    needs_indices: ClassVar[bool] = False
    #: the method reads ``Batch.targets`` as class ids (B,): soft targets (data.mixup_alpha / cutmix_alpha) are
    #: refused at build time; an instance may set it from its options (CRD's other-class negatives)
    class_targets: bool = False
    #: the tasks the method is defined for (None: any), and why, for the error on another task
    tasks: ClassVar[tuple[str, ...] | None] = None
    task_reason: ClassVar[str] = ""

    def __init__(self, cfg: DistillerConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.task: Task = ctx.task if ctx.task is not None else ClassificationTask(ctx.num_classes)
        self.teacher_points: tuple[str, ...] = ()
        self.student_points: tuple[str, ...] = ()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Named, already weighted loss terms; the trainer minimises their sum."""
        losses: dict[str, Tensor] = {}
        if self.cfg.ce_weight:  # {"ce": ...}, or a detector's own terms
            for name, term in self.task.loss_terms(batch.student_logits, batch.targets, batch.task_losses).items():
                losses[name] = self.cfg.ce_weight * term
        if self.cfg.kd_weight:
            if batch.teacher_logits is None:
                raise FeatkdError("kd_weight > 0 needs a teacher")
            losses["kd"] = self.cfg.kd_weight * self.task.kd_loss(
                batch.student_logits, batch.teacher_logits, self.cfg.kd_temperature
            )
        losses.update(self.loss(batch))
        return losses

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """The method's own weighted terms (none for the plain baselines)."""
        return {}

    # life-cycle hooks (all optional) ------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        """Before the first epoch, after a resumed state has been loaded (``ctx.resumed``)."""

    def on_epoch_start(self, epoch: int, ctx: RunContext) -> None:
        """Before epoch ``epoch`` (0-based)."""

    def on_step_end(self, step: int, ctx: RunContext) -> None:
        """After optimiser step ``step`` (0-based, global)."""

    def on_epoch_end(self, epoch: int, ctx: RunContext) -> None:
        """After the last step of epoch ``epoch``, before evaluation and checkpointing."""

    def metrics(self) -> dict[str, float]:
        """Extra numbers to log with each epoch (e.g. the mean matching cost)."""
        return {}

    def eval_metrics(self, ctx: RunContext) -> dict[str, float]:
        """Numbers the method measures at each evaluation (after the task's; e.g. multiteacher's agreement with
        each teacher on held-out images: ``ctx.test_loader``). Every rank calls it (collectives allowed); the
        trainer logs the result with the epoch's record. The default measures nothing."""
        return {}

    def warmup_note(self, epochs: int) -> str | None:
        """One line (naming the option and its value) when the method's own weight ramp has not reached its full
        weight by the last of ``epochs`` epochs, else None; the trainer prints it as a warning when a run is
        built, so a short trial run does not silently train without the method."""
        return None
