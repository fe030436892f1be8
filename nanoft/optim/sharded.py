"""Optimizer maths on FSDP2 shards that gives, gathered, exactly what one process computes on whole tensors.

FSDP2 (`fully_shard`, see nanoft.run.distributed) hands the optimizer DTensors: every parameter is cut along its
first dimension into world_size row ranges (torch.chunk's sizes: ceil(rows / world) each, the last ones shorter
or empty), and each rank holds one range, its gradient and its optimizer states. In flat (row-major) order a
rank's rows are one contiguous run of elements [offset, offset + numel) of the whole tensor.

Element-wise optimizers (AdamW, its paged form) need nothing more. Two kinds of state do:

Blockwise 8-bit states (AdamW8bit) quantize the *whole* tensor's flat order in blocks of 256 elements, so block
boundaries are global: block k is elements [256k, 256k + 256) wherever the shard boundaries fall. A rank keeps
the codes of its elements and the absmax of every block its run touches; a block cut by a shard boundary is kept
by both ranks with the same absmax. Each step a rank dequantizes and updates its own elements (the reference's
element-wise ops), takes the maximum over its part of each block, and the two (or more) ranks sharing a block
max-reduce their partial maxima (`all_gather` of every rank's two edge blocks, a few numbers). A maximum is
exact in any order, so every code and absmax equals the single process's bit for bit, for any world size.
Whether a tensor gets 8-bit states at all is decided from the whole tensor's numel, never the shard's.

Adafactor's factored second moment needs sums over the whole matrix: the column means (over the rows, which
are sharded), the mean of the row statistics, the RMS of the update (for clipping) and of the parameter (for
scale_parameter). Each rank sums its part and an all-reduce adds the parts (`global_sum`); the results equal one
process's up to the order of a floating-point sum.

Checkpoints hold whole tensors: `gather_state` all-gathers a rank's state into the tensor one process would
have (every rank calls it, in the same order), and `local_state` cuts a whole (or DTensor) state back into
this rank's part, so a checkpoint moves between one process and any world size (even one that leaves a rank
with no rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from nanoft.kernels.adamw8bit import BLOCKSIZE, adamw_float32_, dynamic_maps
from nanoft.kernels.blockwise8 import quantize_blocks


@dataclass(frozen=True)
class Part:
    """Where this rank's shard of a parameter sits in the whole tensor."""

    shape: torch.Size  # the whole parameter's shape
    rank: int
    world: int
    group: dist.ProcessGroup
    row_ranges: tuple[tuple[int, int], ...]  # every rank's [first row, end row)

    @property
    def row_numel(self) -> int:
        return self.shape[1:].numel()

    def flat_range(self, rank: int | None = None) -> tuple[int, int]:
        """Elements [start, end) of the whole flat tensor held by `rank` (default: this one)."""
        first, end = self.row_ranges[self.rank if rank is None else rank]
        return first * self.row_numel, end * self.row_numel

    def block_range(self, rank: int | None = None) -> tuple[int, int]:
        """The 8-bit blocks [first, end) that `rank`'s elements touch (empty for a rank with no rows)."""
        start, end = self.flat_range(rank)
        return (start // BLOCKSIZE, -(-end // BLOCKSIZE)) if end > start else (start // BLOCKSIZE,) * 2


def part_of(p: Tensor) -> Part | None:
    """The Part of a DTensor parameter sharded along dim 0 on a 1-D mesh; None for a plain tensor."""
    if not isinstance(p, DTensor):
        return None
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"nanoft's optimizers take FSDP2 parameters sharded along dim 0 on a 1-D mesh, "
                         f"got placements {p.placements} on a {p.device_mesh.ndim}-D mesh")
    world, rows = p.device_mesh.size(), p.shape[0]
    size = -(-rows // world)  # torch.chunk: equal chunks of ceil(rows / world), the last ones shorter or empty
    ranges = tuple((min(r * size, rows), min((r + 1) * size, rows)) for r in range(world))
    part = Part(p.shape, p.device_mesh.get_local_rank(), world, p.device_mesh.get_group(), ranges)
    first, end = ranges[part.rank]
    if p.to_local().shape[0] != end - first:
        raise ValueError(f"unexpected shard of {tuple(p.shape)}: {p.to_local().shape[0]} rows, not {end - first}")
    return part


def local_layout(p: Tensor, part: Part | None) -> tuple[tuple[int, ...], int]:
    """(shape of this rank's element-wise states, number of 8-bit blocks it keeps) for parameter p."""
    if part is None:
        return tuple(p.shape), -(-p.numel() // BLOCKSIZE)
    first, end = part.block_range()
    return tuple(p.to_local().shape), end - first


def global_sum(x: Tensor, part: Part | None) -> Tensor:
    """x summed over the ranks holding parts of the tensor (x itself without sharding)."""
    if part is not None:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=part.group)
    return x


# --- the 8-bit AdamW step on one rank's part ---


def _edge_maxima(blocks: Tensor, part: Part) -> Tensor:
    """Every block's maximum over all ranks, given this rank's per-block maxima `blocks` (over its own elements).

    Only a rank's first and last block can be shared, so each rank contributes those two (block index and
    maximum); every rank gathers all of them and raises its own edge blocks to the largest value seen."""
    first, end = part.block_range()
    mine = torch.full((2, 1 + blocks.shape[1]), -1.0, dtype=torch.float64, device=blocks.device)
    if end > first:  # a rank without rows sends index -1
        mine[0, 0], mine[1, 0] = first, end - 1
        mine[0, 1:], mine[1, 1:] = blocks[0].double(), blocks[-1].double()
    every = [torch.empty_like(mine) for _ in range(part.world)]
    dist.all_gather(every, mine, group=part.group)
    every = torch.cat(every)  # (2 world, 1 + states)
    out = blocks.clone()
    for i in sorted({0, end - first - 1}) if end > first else ():
        same = every[every[:, 0] == first + i, 1:]
        out[i] = torch.maximum(out[i], same.amax(dim=0).to(out.dtype))
    return out


@torch.no_grad()
def adamw8bit_part_update_(p: Tensor, g: Tensor, states: dict[str, Tensor], part: Part, *, step: int, lr: float,
                           beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The AdamW8bit reference step (nanoft.kernels.adamw8bit) on this rank's elements, in place.

    p, g: this rank's rows (float32 maths, written back in p's dtype); states: its codes (p's local shape) and
    the absmax of the blocks it touches. The element-wise operations are the reference's, in its order, so the
    results are the single process's bits; only the block maxima cross ranks."""
    code1, code2 = dynamic_maps(p.device)
    start, end = part.flat_range()
    first_block = start // BLOCKSIZE
    lead = start - first_block * BLOCKSIZE  # elements of the first block that belong to earlier ranks
    n = end - start
    n_blocks = states["exp_avg_absmax"].numel()
    block_of = (torch.arange(n, device=p.device) + lead) // BLOCKSIZE  # local block of each element
    m = code1[states["exp_avg_codes"].reshape(-1).long()] * states["exp_avg_absmax"][block_of]  # dequantize
    v = code2[states["exp_avg_sq_codes"].reshape(-1).long()] * states["exp_avg_sq_absmax"][block_of]
    p32 = p.reshape(-1).float()  # a view of p itself when p is float32
    adamw_float32_(p32, g.reshape(-1).float(), m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                   weight_decay=weight_decay)
    if p32.data_ptr() != p.data_ptr() or p32.dtype != p.dtype:
        p.copy_(p32.view(p.shape))

    # this rank's elements in whole blocks (zeros where other ranks' elements are: they never raise a maximum)
    padded = torch.zeros(2, n_blocks * BLOCKSIZE, dtype=torch.float32, device=p.device)
    padded[0, lead: lead + n], padded[1, lead: lead + n] = m, v
    padded = padded.view(2, n_blocks, BLOCKSIZE)
    absmax = _edge_maxima(padded.abs().amax(dim=2).t(), part).t()  # (2, n_blocks): the whole blocks' maxima
    for k, (name, code) in enumerate((("exp_avg", code1), ("exp_avg_sq", code2))):
        codes = quantize_blocks(padded[k], absmax[k], code).reshape(-1)[lead: lead + n]
        states[f"{name}_codes"].copy_(codes.view(states[f"{name}_codes"].shape))
        states[f"{name}_absmax"].copy_(absmax[k])


# --- checkpoints: whole states out, this rank's part back in ---


def gather_state(name: str, value, p: Tensor, part: Part):
    """The whole-tensor form of this rank's state `name` of p (every rank must call, in the same order)."""
    if not isinstance(value, Tensor) or name.endswith("_col"):  # steps; Adafactor's column means are whole
        return value
    if name.endswith("_absmax"):
        first, end = part.block_range()
        whole = torch.zeros(-(-part.shape.numel() // BLOCKSIZE), dtype=value.dtype, device=value.device)
        whole[first:end] = value  # a shared block: every holder has the same value
        dist.all_reduce(whole, op=dist.ReduceOp.MAX, group=part.group)  # absmax >= 0: max with zeros is exact
        return whole
    # row-shaped: the parameter's own shape, or Adafactor's row statistics (its shape without the last dim)
    shape = part.shape if value.dim() == len(part.shape) else part.shape[:-1]
    return DTensor.from_local(value, p.device_mesh, [Shard(0)], shape=shape,
                              stride=torch.empty(shape, device="meta").stride()).full_tensor()


def gather_states(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """`optimizer.state_dict()` with every sharded parameter's states gathered whole (every rank must call)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # torch numbers them in this order
    for i, p in enumerate(params):
        if isinstance(p, DTensor) and i in state_dict["state"]:
            state_dict["state"][i] = {k: gather_state(k, v, p, part_of(p)) for k, v in state_dict["state"][i].items()}
    return state_dict


def local_state(name: str, value, p: Tensor, part: Part):
    """This rank's part of a whole (or already sharded DTensor) saved state `name` of p."""
    if isinstance(value, DTensor):
        return value.to_local()
    if not isinstance(value, Tensor) or name.endswith("_col"):
        return value
    if name.endswith("_absmax"):
        first, end = part.block_range()
        return value[first:end]
    first, end = part.row_ranges[part.rank]
    return value[first:end]
