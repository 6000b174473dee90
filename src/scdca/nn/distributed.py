"""Data-parallel training with torch DDP, and mixed precision.

Launch any training command under torchrun, e.g.
    torchrun --nproc-per-node 2 --no-python scdca train ...
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `context()` then joins the process group
(NCCL on CUDA, gloo on CPU). Every rank builds the same global batch from the same seed,
keeps its share of the rows (`shard`), and scales its loss with `global_mean_loss`, so
that DDP's gradient average equals the gradient of the one-process loss on the whole
batch: the loss curve matches a single process with the same global batch. Only rank 0
writes files and shows progress. Without torchrun, everything is one process as before.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from scdca.errors import ScdcaInputError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = get_args(Precision)


@dataclass(frozen=True)
class Context:
    """This process's place in the job: rank, number of processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context(device: str | torch.device | None = None) -> Context:
    """Join the torchrun process group if this process is one of several; else a one-process context.

    With CUDA each rank uses GPU LOCAL_RANK; otherwise `device` (default: cuda if present, else cpu).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    cuda = torch.cuda.is_available() and str(device or "cuda").startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    dev = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        if cuda
        else torch.device("cpu")
    )
    return Context(rank=rank, world=dist.get_world_size(), device=dev)


def shard(rows, ctx: Context):
    """This rank's share of a global batch (every world-th row, starting at its rank)."""
    return rows[ctx.rank :: ctx.world]


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """DDP around `module` when there are several processes (trainable parameters only are synced)."""
    if ctx.world == 1:
        return module
    import inspect

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # buffers are never trained here, and syncing them would put a collective in every forward
    # (torch 2.13 renamed the switch); find_unused_parameters: some variants leave parts unused
    no_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True, **no_sync)


def global_mean_loss(sq_err_sum: Tensor, n_global: int | float, ctx: Context) -> Tensor:
    """This rank's loss term: its summed squared error over the global element count, times
    the world size (DDP averages gradients over ranks, which this undoes)."""
    return sq_err_sum * (ctx.world / n_global)


def all_sum(values: float | Tensor, ctx: Context) -> np.ndarray:
    """Sum a number or a vector over all ranks, elementwise (itself with one process), as float64 numpy."""
    t = torch.as_tensor(values, device=ctx.device).detach().to(torch.float64)
    if ctx.world > 1:
        dist.all_reduce(t)
    return t.cpu().numpy()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ScdcaInputError(
            f"precision: {precision!r}; choose one of {', '.join(PRECISIONS)} (auto: bf16 on CUDA, fp32 on CPU)"
        )
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast for 'bf16', and for 'auto' on CUDA; fp32 otherwise (CPU default)."""
    check_precision(precision)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
