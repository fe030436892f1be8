"""Data-parallel training with PyTorch's own engine, started by torchrun.

    torchrun --nproc_per_node=2 train.py configs/tiny.py

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process and every
function here is a no-op. DDP keeps a full model per rank and all-reduces gradients in backward.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0  # only rank 0 logs, samples and writes checkpoints


def setup(device: str) -> Dist:
    """Join the process group torchrun describes: NCCL for CUDA, gloo for CPU."""
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return d


def device_for(d: Dist, device: str) -> str:
    return f"cuda:{d.local_rank}" if d.enabled and device == "cuda" else device


def wrap(model: nn.Module, d: Dist, device: str) -> nn.Module:
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if device.startswith("cuda") else None)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def sync_gradients(model: nn.Module, last_micro_step: bool):
    """Skip DDP's all-reduce on every micro-step but the last of a gradient-accumulation step."""
    if hasattr(model, "no_sync") and not last_micro_step:
        return model.no_sync()
    return contextlib.nullcontext()


def mean_across_ranks(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":
            value /= d.world_size  # gloo has no AVG
    return value


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.enabled:
        dist.destroy_process_group()
