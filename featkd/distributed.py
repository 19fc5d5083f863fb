"""Where a process sits in a run (:class:`DistInfo`), and the process group of runs launched with ``torchrun``.

A low module: it imports only torch and :mod:`featkd.errors`, so every layer may use it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from featkd.errors import FeatkdError


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    process_group: bool = False  # joined a torch.distributed group (under torchrun, even with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Collectives and DDP are in use: several processes, or one process launched by torchrun."""
        return self.process_group or self.world_size > 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over all ranks, in place (no-op in a single process). Every rank must call it."""
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0 in rank order; the
        tensor itself in a single process. Every rank must call it."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def broadcast(self, tensor: Tensor, src: int = 0) -> Tensor:
        if self.enabled:
            torch.distributed.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def launched_by_torchrun() -> bool:
    """torchrun (or another launcher speaking its protocol) set the rendezvous variables, even for one
    process: then the run joins a process group (nccl on one GPU is still nccl, and DDP still wraps)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def select_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:LOCAL_RANK when CUDA is available, else cpu; ``cuda`` without index likewise."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FeatkdError(f"train.device: {preference!r} requested but CUDA is not available here")
        if preference == "cuda":
            return torch.device("cuda", local_rank)
    try:
        return torch.device(preference)
    except RuntimeError:
        raise FeatkdError(f"train.device: {preference!r} is not a device (use auto, cpu, cuda or cuda:N)") from None


def init_distributed(device_preference: str) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun (gloo on CPU, nccl on CUDA); pick this rank's device."""
    if not launched_by_torchrun():
        return DistInfo(), select_device(device_preference)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if rank == 0 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and \
                os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            print("featkd: warning: torchrun restarted the workers on the rendezvous store it shares with them, "
                  "where the last attempt's addresses may still be read (pytorch/pytorch#135712); start torchrun "
                  "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 if joining the process group fails", file=sys.stderr)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, process_group=True), device


def process_group_info() -> DistInfo:
    """This process's place in the torch.distributed group it joined (one process when there is none)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return DistInfo()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    return DistInfo(rank=rank, world_size=world, local_rank=local, process_group=True)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank (e.g. a decision only rank 0 can make)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: object, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
