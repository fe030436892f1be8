"""One rank's memory under FSDP2 (`torchrun --nproc_per_node=N train.py CONFIG --fsdp=True`), from the
single-process estimate (nanoft.tools.memory.peak), as nanoft.run.distributed.place shards a model:

    sharded      fully_shard splits every parameter along dim 0 into N pieces of ceil(d0 / N) rows (the last
                 one padded) and each rank keeps one. Full fine-tuning shards all of it: weights, gradients
                 (reduce-scattered) and the optimizer's states, which nanoft.optim.sharded computes on the
                 shards. LoRA and QLoRA shard only the frozen base (QLoRA: its NF4 codes and block scales, as
                 1-D tensors); the few trained tensors stay whole on every rank, with their gradients and states.
    gathered     while a group of parameters computes it is whole: FSDP2 all-gathers one block at a time (in
                 the run's dtype under mixed precision) and prefetches the next, so two blocks are whole at
                 once; the root group (embeddings, final norm, the tied head) stays gathered from the start of
                 forward to the end of backward (FSDP2 does not reshard the root after forward).
    per rank     activations, logits and the optimizer's scratch are those of the rank's own batch: train.py's
                 batch_size is per rank, so they are the single-process figures.

States follow their shards (shard_state_bytes); an 8-bit block that a shard boundary cuts has a scale on both
ranks, which this counts to within one scale per tensor. DDP (no --fsdp) shards nothing: each rank holds the single-process figure.
"""
from __future__ import annotations

import math

from nanoft.optim import Adafactor, AdamW8bit, PagedAdamW, optimizer_class
from nanoft.tools.memory.estimate import Run, nf4_bytes, state_bytes, trainable_and_frozen
from nanoft.tools.memory.shape import ModelShape, ParamSpec, param_specs


def shard_numel(p: ParamSpec, world: int) -> int:
    """Elements one rank keeps of a parameter: ceil(d0 / N) rows of dim 0 (FSDP2 pads the last shard)."""
    return math.ceil(p.shape[0] / world) * math.prod(p.shape[1:])


def shard_state_bytes(p: ParamSpec, elem: int, run: Run, world: int) -> int:
    """Optimizer state one rank keeps for its shard of `p`: the same kind of state as for the whole tensor (the
    fp32-or-8-bit choice is the whole tensor's), over the shard's rows. Adafactor's column statistics are whole on
    every rank (the column sums are all-reduced); AdamW's step counter is whole too."""
    rows = math.ceil(p.shape[0] / world)
    shard = ParamSpec(p.name, (rows, *p.shape[1:]))
    cfg = run.cfg
    cls = optimizer_class(cfg.optimizer)
    if issubclass(cls, AdamW8bit) and cls is not PagedAdamW and p.numel >= cfg.min_8bit_size:
        n = shard.numel
        return 2 * n + 2 * 4 * math.ceil(n / 256)  # 8-bit codes, one fp32 absmax per 256 (a cut block on both ranks)
    if cls is Adafactor and len(p.shape) >= 2:  # rows of the shard, whole columns
        return 4 * (math.prod(shard.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1])
    return state_bytes(shard, elem, cfg)


def per_rank(est: dict, shape: ModelShape, run: Run, world: int) -> dict:
    """The estimate `est` (nanoft.tools.memory.peak.peak_bytes of the same shape and run) for one of `world` FSDP2
    ranks: parameters, gradients and states sharded as the module docstring says, plus the gathered groups."""
    if world <= 1:
        return est
    if shape.arch == "nominal":
        raise ValueError("per-rank memory under FSDP needs the layer shapes: give --shape or dimensions")
    trainable, frozen = trainable_and_frozen(shape, run)
    replicate = run.mode in ("lora", "qlora")  # nanoft.run.distributed.place: the trained tensors stay whole
    trained = sum(p.numel * e for p, e in trainable)
    trained_shard = trained if replicate else sum(shard_numel(p, world) * e for p, e in trainable)
    states = est["states"] + est["states_host"]
    states_shard = states if replicate else sum(shard_state_bytes(p, e, run, world) for p, e in trainable)
    params = math.ceil(frozen / world) + trained_shard
    gathered = _gathered_bytes(shape, run)
    rows = {"params": params, "grads": trained_shard,
            "states": 0 if est["states_host"] else states_shard, "states_host": states_shard if est["states_host"] else 0}
    saved = sum(est[k] - rows[k] for k in rows)
    return {**est, **rows, "gathered": gathered, "total": est["total"] - saved + gathered, "world": world}


def _gathered_bytes(shape: ModelShape, run: Run) -> int:
    """Whole parameters on a rank at its busiest: the root group plus two blocks (one computing, one prefetched),
    in the dtype they are gathered in (the autocast dtype for trained float32 weights; storage dtype otherwise)."""
    gather_elem = run.act_bytes if run.mode == "full" else run.frozen_bytes
    root, blocks = 0, {}
    for p in param_specs(shape):
        if not p.name.startswith("blocks."):
            root += p.numel * gather_elem
            continue
        block = int(p.name.split(".")[1])
        if run.mode == "qlora" and p.target and len(p.shape) == 2:  # NF4 codes and scales, gathered as stored
            size = nf4_bytes(p.numel, run.cfg.nf4_blocksize, run.cfg.double_quant, run.device == "cpu")
        else:
            size = p.numel * gather_elem
        blocks[block] = blocks.get(block, 0) + size
    return root + 2 * max(blocks.values(), default=0)
