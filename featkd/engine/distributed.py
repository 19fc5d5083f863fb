"""Process-group set-up for runs launched with ``torchrun`` (or a single plain process)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from featkd.errors import FeatkdError
from featkd.methods.base import DistInfo


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
