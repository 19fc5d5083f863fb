"""FitNets (Romero et al., ICLR 2015): regress teacher features from student features through a connector.

For every pair ``[student_point, teacher_point]`` a freshly initialised 1x1 convolution (optionally
followed by BatchNorm; CRD's ``ConvReg`` also puts a ReLU after its BatchNorm, featkd's connector has none,
so it can regress pre-ReLU targets, which are negative too) maps the student's C_s channels to the teacher's C_t, and
``weight * mean((connector(s) - t)^2)`` is added per pair. The original trains the hint in a first stage;
like the common CIFAR benchmarks (CRD, mdistiller) we train it jointly with the task loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig
from featkd.methods.common import check_spatial, conv1x1_connector, resize_like, use_pairs


@dataclass
class FitNetsConfig(DistillerConfig):
    pairs: list[list[str]] = field(default_factory=list)  # [[student_point, teacher_point], ...]
    weight: float = 1.0  # multiplies the mean squared error of each pair
    connector: Literal["conv1x1", "conv1x1-bn"] = "conv1x1"
    resize_teacher: bool = False  # adaptive-average-pool teacher maps to the student's spatial size


@register("fitnets")
class FitNets(Distiller):
    Config = FitNetsConfig

    def __init__(self, cfg: FitNetsConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.pairs, s_shapes, t_shapes = use_pairs(self, cfg.pairs, ctx)
        self.connectors = nn.ModuleList()
        for s, t in self.pairs:
            check_spatial(s, s_shapes[s], t, t_shapes[t], cfg.resize_teacher)
            self.connectors.append(
                conv1x1_connector(s_shapes[s][0], t_shapes[t][0], cfg.connector == "conv1x1-bn")
            )

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        total = 0.0
        for (s, t), connector in zip(self.pairs, self.connectors, strict=True):
            fs = connector(batch.student_features[s])
            ft = resize_like(batch.teacher_features[t], fs.shape[-2:])
            total = total + F.mse_loss(fs.float(), ft.float())
        return {"fitnets": self.cfg.weight * total}
