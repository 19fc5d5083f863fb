"""Several teachers as one frozen module: :class:`TeacherEnsemble` (the config's ``teachers:`` section).

The engine knows one teacher. An ensemble is that one teacher: its members are child modules under the names
the user gave them (``self.dino``, ``self.cnn``), so the capture layer, the teacher cache, DDP and every method
see an ordinary module whose capture points are ``dino.blocks.11`` or ``cnn.layer3`` (hooks on the members'
modules; nothing is traced or copied). One forward::

    x (B, C, H, W), normalised with the data's mean / std
      -> raw = x * std_data + mean_data                        the [0, 1] pixels
      -> per member: raw repeated to its channels (grey -> RGB; RGB -> a grey member: the channel mean),
         bilinear-resized to its input_size,
         normalised with its own mean / std -> member(view)    in the members' order
      -> the first member's output                             (KD-style logits still work when it is a classifier)

Members whose view is the data's own (no ``input_size``, no ``mean`` / ``std``) get ``x`` itself, bit for bit.
The resize is ``F.interpolate(..., mode="bilinear", align_corners=False, antialias=True)`` when it shrinks
(the PIL-like resize most pretrained encoders saw), plain bilinear when it enlarges. ``input_shapes`` records
the shape each member saw in the last forward (for tests and the curious; not state).

:meth:`qualify` turns the ``NAME:point`` spelling (``dino:blocks.11:tokens``) into the capture point
``dino.blocks.11:tokens``; the engine applies it to every method's ``pairs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.errors import FeatkdError


@dataclass(frozen=True)
class MemberView:
    """How a member sees the batch: ``size`` (H, W) or None (the data's), ``mean`` / ``std`` per channel or None
    (the data's normalisation), ``channels``: the member's input channels."""

    size: tuple[int, int] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    channels: int


class TeacherEnsemble(nn.Module):
    """Frozen teachers ``members`` (name -> module, in order) seen through their :class:`MemberView`;
    ``data_mean`` / ``data_std``: the normalisation of the batches it is given (the data bundle's)."""

    def __init__(self, members: Mapping[str, nn.Module], views: Mapping[str, MemberView],
                 data_mean: Sequence[float], data_std: Sequence[float]) -> None:
        super().__init__()
        if not members:
            raise FeatkdError("teachers: an ensemble needs at least one teacher")
        self.member_names: tuple[str, ...] = tuple(members)
        self.views = dict(views)
        for name, module in members.items():
            self.add_module(name, module)
        c = len(data_mean)
        self.register_buffer("data_mean", torch.tensor(list(data_mean), dtype=torch.float32).view(1, c, 1, 1),
                             persistent=False)
        self.register_buffer("data_std", torch.tensor(list(data_std), dtype=torch.float32).view(1, c, 1, 1),
                             persistent=False)
        for name, view in self.views.items():
            if view.mean is not None:
                self.register_buffer(f"_mean_{name}", torch.tensor(view.mean).view(1, -1, 1, 1), persistent=False)
                self.register_buffer(f"_std_{name}", torch.tensor(view.std).view(1, -1, 1, 1), persistent=False)
        self.input_shapes: dict[str, tuple[int, ...]] = {}

    def member(self, name: str) -> nn.Module:
        return self.get_submodule(name)

    def qualify(self, point: str) -> str:
        """``NAME:point`` -> ``NAME.point`` when NAME is a member (any other point unchanged)."""
        head, sep, rest = point.partition(":")
        return f"{head}.{rest}" if sep and head in self.member_names and rest else point

    def member_of(self, point: str) -> str | None:
        """The member whose capture point ``point`` is (``dino`` for ``dino.blocks.11:tokens``), else None."""
        head = self.qualify(point).split(".", 1)[0].split(":", 1)[0].split("[", 1)[0]
        return head if head in self.member_names else None

    def view_of(self, name: str, x: Tensor) -> Tensor:
        """Member ``name``'s input for the data-normalised batch ``x`` (see the module docstring)."""
        view = self.views[name]
        if view.size is None and view.mean is None and view.channels == x.shape[1]:
            return x
        raw = x.float() * self.data_std + self.data_mean
        if view.channels != raw.shape[1]:
            if view.channels == 1:  # a grey teacher: the mean of the channels (exact for grey images read as RGB)
                raw = raw.mean(1, keepdim=True)
            elif raw.shape[1] == 1:
                raw = raw.expand(-1, view.channels, -1, -1)
            else:
                raise FeatkdError(f"teachers.{name}: takes {view.channels} input channels, the data has "
                                  f"{raw.shape[1]} (a 1-channel batch is repeated, a grey teacher takes the mean)")
        if view.size is not None and tuple(raw.shape[-2:]) != view.size:
            shrink = view.size[0] < raw.shape[-2] or view.size[1] < raw.shape[-1]
            raw = F.interpolate(raw, size=view.size, mode="bilinear", align_corners=False, antialias=shrink)
        if view.mean is not None:
            out = (raw - getattr(self, f"_mean_{name}")) / getattr(self, f"_std_{name}")
        else:  # the data's normalisation, per channel (repeated with the channels)
            mean, std = self.data_mean, self.data_std
            out = (raw - mean) / std
        return out.to(x.dtype)

    def forward(self, x: Tensor) -> object:
        outputs = {}
        for name in self.member_names:
            view = self.view_of(name, x)
            self.input_shapes[name] = tuple(view.shape)
            outputs[name] = self.get_submodule(name)(view)
        return outputs[self.member_names[0]]


def member_view(name: str, input_size: int | Sequence[int] | None, mean: Sequence[float] | None,
                std: Sequence[float] | None, channels: int) -> MemberView:
    """A :class:`MemberView` from a ``teachers:`` entry (an int size is a square); checks the channel counts."""
    size = None if input_size is None else (
        (int(input_size), int(input_size)) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1])))
    if mean is not None and len(mean) != channels:
        raise FeatkdError(f"teachers.{name}.mean: {len(mean)} values for a teacher of {channels} input channels")
    return MemberView(size, None if mean is None else tuple(float(v) for v in mean),
                      None if std is None else tuple(float(v) for v in std), channels)


def input_channels(model: nn.Module) -> int | None:
    """The input channels of ``model``'s first convolution (a patch embedding too), None when it has none."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None
