"""Data-parallel (DDP) and sharded (FSDP2) training with PyTorch's own engine, started by torchrun.

    torchrun --nproc_per_node=2 train.py configs/tiny.py                # DDP: a full model per rank
    torchrun --nproc_per_node=2 train.py configs/tiny.py --fsdp=True    # FSDP2: each rank holds 1/N of it

torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a
single process and every function here is a no-op (a plain `python train.py` run is unchanged).

DDP (data parallel). Every rank holds the whole model and optimizer, reads different rows of each batch
(`nanoft.data.tokens.Batches` gives rank r rows [r*B, (r+1)*B) of a global batch of B * world_size rows) and, in
backward, all-reduces (averages) the gradients, so every rank takes the same optimizer step. Each rank's
loss is the mean over its B rows, so with equal rows per rank the averaged gradient is exactly the
gradient of the mean loss over the global batch: 2 ranks of batch_size B train like 1 process of 2B.
SFT's loss is a mean over response tokens, whose number differs between ranks: each rank's mean is weighted by
its share of them (`token_share`) so that the same holds.
With gradient accumulation the all-reduce runs only on the last micro-step (`sync_gradients`).

FSDP2 (`fsdp=True`, PyTorch's `fully_shard`; DeepSpeed calls the same idea ZeRO-3). Every parameter of each
transformer block, and of the rest of the model, is split in N pieces along its first dimension (a
DTensor); each rank keeps one piece, and its gradients and optimizer state for that piece only. Before a
block runs, its pieces are all-gathered into the full weights; after, they are freed; in backward the
gradients are reduce-scattered, so each rank gets the averaged gradient of its own piece. Memory per rank
for parameters + gradients + Adam states is about 1/N of the model's, at the cost of those collectives.
Unlike DDP, the gradients are reduce-scattered on every micro-step of gradient accumulation: skipping it
would keep a full-size gradient on every rank, which is exactly the memory sharding exists to save.

LoRA and QLoRA shard too: the frozen base like any weight (FSDP2 gathers frozen parameters and reduces no
gradient for them); the adapters (and trained norms) are a few KiB and stay whole on every rank, their
gradients averaged across ranks as DDP does. QLoRA's NF4 weights become frozen 1-D parameters (the
uint8 codes and their block scales: `Linear4bit.hold_as_parameters`), each Linear4bit its own group, so each
rank keeps 1/N of the codes and scales and the layer dequantizes the gathered whole in forward and backward.
So rank 0 holds the whole adapters and writes the adapter file a single process writes.

With bf16 (or fp16) training, FSDP2 keeps the sharded master weights, their gradients and the optimizer
in float32, all-gathers the parameters in the low precision (half the traffic and the transient memory of
the unsharded block) and reduce-scatters gradients in float32 (`mixed_precision`).

Dropout: every rank builds the same weights from the same seed, then (`seed_ranks`) reseeds with seed + rank,
so each draws its own dropout masks on its own rows; with one seed all ranks would drop the same units.

Checkpoints stay one plain file: `full_state_dict` gathers full weights and optimizer state to rank 0,
which writes the same safetensors checkpoint a single process writes; `load_optimizer_state` cuts a full
state back into this rank's shards. So a checkpoint moves freely between 1 process, DDP and FSDP.
`rng_state` gathers every rank's own generators to rank 0, and on resume each rank continues its own.

What must match when resuming: the *global* batch, batch_size * world_size (times grad_accum). The data
position is counted in global batches, so a 2-rank run with batch_size=4 continues exactly in one process
with batch_size=8 (or in 2 ranks with batch_size=4 again).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nanoft.run import checkpoint

# Every optimizer takes sharded parameters: torch.optim.AdamW is element-wise and DTensor-aware; nanoft's own
# compute over whole tensors (8-bit blocks, Adafactor's row and column statistics) and do that across the
# ranks' shards (nanoft.optim.sharded), so the gathered state is the one a single process has.


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    fsdp: bool = False  # the model is sharded (only ever True with world_size > 1)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0  # only rank 0 logs, samples and writes checkpoints


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 for a plain `python train.py`); usable before setup()."""
    return int(os.environ.get("RANK", "0"))


def check_device(device: str) -> None:
    """A device the config names must exist: one line now, not an assertion deep inside torch later."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device={device} but {why}; use --device=cpu (or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device=mps but MPS is not available here; use --device=cpu (or auto)")


def exit_with_launcher() -> None:
    """A worker ends when its launcher does. torchrun starts the workers as its children; killed itself
    (kill -9, a lost SSH session), it cannot stop them, and they would train on and write checkpoints with no
    one watching. Linux's prctl(PR_SET_PDEATHSIG) has the kernel send this process SIGTERM when its parent
    dies. The write protocol (nanoft.run.checkpoint) makes dying mid-save safe. Elsewhere there is no such call."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the call took effect: no signal will come
        sys.exit("error: the launcher (torchrun) exited before this worker started")


def setup(device: str, cfg) -> Dist:
    """Join the process group torchrun describes: NCCL for CUDA, gloo for CPU.

    A collective waits at most cfg.dist_timeout seconds for the other ranks: a rank that died or hangs
    then ends the run with an error instead of keeping the others (and their GPUs) waiting forever."""
    check_device(device)
    if "RANK" not in os.environ:
        return Dist()  # a single process: fsdp=True changes nothing (one shard is the whole model)
    exit_with_launcher()
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    d = Dist(rank, local_rank, world_size, fsdp=cfg.fsdp and world_size > 1)
    if device.startswith("cuda"):
        torch.cuda.set_device(d.local_rank)  # NCCL collectives run on the current device
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return d


def device_for(d: Dist, device: str) -> str:
    return f"cuda:{d.local_rank}" if d.enabled and device == "cuda" else device


def mixed_precision(dtype: torch.dtype):
    """FSDP2's policy for a run in `dtype`: parameters all-gathered in it, gradients reduced in float32 (a
    sum of N low-precision gradients loses bits), the shards and the optimizer staying float32. None for
    float32: nothing to cast."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def place(model: nn.Module, d: Dist, device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Move the model to its device; with fsdp, shard it on the way, so no rank ever holds all of it there.

    fully_shard is applied to each block, then to the root (embeddings, final LayerNorm, the tied head):
    each call makes one group of parameters that is all-gathered and freed together. It moves each group
    to the device, splits every parameter into world_size pieces along dim 0 and keeps this rank's piece;
    the model's class becomes an FSDP subclass in place, so `model` is still the GPT. Every rank built the
    same initial weights from the same seed, so the pieces fit together (fully_shard does not broadcast).
    The optimizer must be made after this call: it must hold the sharded parameters."""
    if not d.fsdp:
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.split(":")[0], (d.world_size,))
    policy = mixed_precision(dtype) or MixedPrecisionPolicy()  # the default casts nothing
    # LoRA/QLoRA: the few trained tensors stay whole on every rank (DDP-style: each gradient averaged as it is
    # made), so rank 0 saves the adapters a single process saves; the frozen base is what is worth sharding
    partial = any(not p.requires_grad for p in model.parameters())  # a frozen base: LoRA, QLoRA
    replicated = {p for p in model.parameters() if p.requires_grad} if partial else set()
    for p in replicated:
        p.register_hook(lambda grad: mean_across_ranks(grad, d))
    # QLoRA's frozen base: NF4 layers (nanoft.quant.Linear4bit) hold their weight outside the parameters
    for nf4 in [m for m in model.modules() if hasattr(m, "hold_as_parameters")]:
        nf4.hold_as_parameters()  # codes and scales become frozen 1-D parameters: sharded like any weight
        fully_shard(nf4, mesh=mesh, mp_policy=MixedPrecisionPolicy())  # own group: the scales are never cast
        nf4.weight = nf4.nf4_weight()  # now over this rank's shards: the whole codes are freed
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=replicated)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=replicated)
    return model


def wrap(model: nn.Module, d: Dist, device: str) -> nn.Module:
    """DDP around the (possibly compiled) model; a sharded model needs no wrapper."""
    if not d.enabled or d.fsdp:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if device.startswith("cuda") else None)


def sync_gradients(model: nn.Module, last_micro_step: bool):
    """Skip DDP's all-reduce on every micro-step but the last of a gradient-accumulation step."""
    if hasattr(model, "no_sync") and not last_micro_step:
        return model.no_sync()  # gradients accumulate locally; the last backward all-reduces their sum
    return contextlib.nullcontext()


def ranks() -> int:
    """How many processes train together: the process group's size, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across_ranks(value: Tensor) -> Tensor:
    """A new tensor: value summed over every rank of the process group (every rank must call); a copy without one."""
    value = value.clone()
    if ranks() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def token_share(n_tokens: Tensor) -> Tensor:
    """world_size * n / (n summed over ranks): what turns this rank's mean loss over its own n loss tokens into its
    share of the mean over every rank's tokens (every rank must call; 1 in a single process).

    DDP and FSDP average the ranks' gradients, which weights each rank's mean alike. When ranks hold different
    numbers of loss tokens (SFT: masked prompts and padding) that is not the token mean one process takes over the
    whole batch; mean over r of (share_r * loss_r) = sum_r n_r loss_r / sum_r n_r is, so 2 ranks of B rows still
    train like 1 process of 2B rows."""
    return n_tokens.float() * ranks() / sum_across_ranks(n_tokens.float())


def mean_across_ranks(value: Tensor, d: Dist) -> Tensor:
    """The mean of a tensor over ranks (every rank must call). SUM then divide: gloo has no ReduceOp.AVG."""
    return sum_across_ranks(value) / d.world_size if d.enabled else value


def _full(value, keep: bool):
    """A full tensor from a shard (an all-gather: every rank must call, in the same order), on the CPU
    where rank 0 keeps it; other ranks drop theirs at once. Anything not a DTensor passes through."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    if not keep:
        return None
    return value.detach().cpu() if isinstance(value, Tensor) else value


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist,
                    weights: bool = True) -> tuple[dict, dict]:
    """(weights, optimizer state) as a single process has them, on rank 0; ({}, {}) elsewhere.

    With fsdp every rank must call this: each sharded tensor is all-gathered. The result has the keys of
    `model.state_dict()` and `optimizer.state_dict()` (integer parameter ids), so it is saved and loaded
    exactly like a single process's checkpoint. Without fsdp, rank 0 already holds everything.
    weights=False leaves the weights out ({}): a LoRA/QLoRA run saves only its adapters, which every rank holds
    whole, so gathering the frozen base would bring the whole model to rank 0 at every save for nothing."""
    if not d.fsdp:
        return (model.state_dict() if weights else {}, optimizer.state_dict()) if d.is_master else ({}, {})
    keep = d.is_master
    params = dict(model.named_parameters(remove_duplicate=False))
    gathered: dict[int, Tensor] = {}  # id(parameter) -> full tensor: the tied head and embedding stay one
    full_weights = {}
    for name, value in (model.state_dict() if weights else {}).items():
        key = id(params.get(name, value))
        if key not in gathered:
            gathered[key] = _full(value, keep)
        full_weights[name] = gathered[key]
    state = optimizer.state_dict()
    optim = {"state": {i: {k: _full(v, keep) for k, v in slots.items()} for i, slots in state["state"].items()},
             "param_groups": state["param_groups"]}
    return (full_weights, optim) if keep else ({}, {})


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, d: Dist) -> None:
    """Load a full optimizer state (from any world size); with fsdp each rank keeps its shard of it.

    Parameter ids follow the optimizer's parameter order, which is the same however the run is launched.
    A state tensor shaped like its (sharded) parameter is cut the way the parameter was, locally.
    The hyperparameters in each param group (lr, weight_decay, betas, eps, fused...) stay what this run's
    config made them: a resume may change them, and the saved ones may not even fit this device."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if d.fsdp:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {"state": {int(i): dict(slots) for i, slots in state["state"].items()},
                 "param_groups": state["param_groups"]}
        for i, slots in state["state"].items():
            p = params[i]
            for k, v in slots.items():
                if isinstance(p, DTensor) and isinstance(v, Tensor) and v.shape == p.shape:
                    # src_data_rank=None: every rank holds the full tensor already; no communication
                    slots[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    optimizer.load_state_dict(state)
    for group, hyper in zip(optimizer.param_groups, own):
        group.update(hyper)


def seed_ranks(d: Dist, seed: int, device: str, saved_rng: dict[str, Tensor] | None) -> None:
    """Each rank its own dropout masks: call after the model is built (every rank the same weights) and
    before training. A single process keeps its one stream, so its numbers stay what they were. On resume,
    each rank continues its own saved generators; if the checkpoint was saved by another number of
    processes, say so (the masks then differ from an uninterrupted run's; so do the batches' splits)."""
    if d.enabled:
        torch.manual_seed(seed + d.rank)  # nanoGPT's 1337 + rank; weights are built, data has its own generator
    if saved_rng is None:
        return
    saved = checkpoint.set_own_rng_state(saved_rng, d.rank, d.world_size, device)
    if saved != d.world_size and d.is_master:
        kept = min(saved, d.world_size)
        print(f"resume: RNG states saved by {saved} process(es), resumed by {d.world_size}: "
              + ("rank 0 continues rank 0's" if kept == 1 else f"ranks 0-{kept - 1} continue theirs")
              + (", the others start from seed + rank" if d.world_size > saved else "")
              + "; dropout masks no longer match an uninterrupted run")


def rng_state(d: Dist, device: str) -> dict[str, Tensor]:
    """The RNG states a checkpoint records, on rank 0 ({} elsewhere; every rank must call): a single
    process's generators, or every rank's own, gathered (`checkpoint.per_rank` names them)."""
    if not d.enabled:
        return checkpoint.rng_state()
    states = [None] * d.world_size if d.is_master else None
    dist.gather_object(checkpoint.own_rng_state(device), states, dst=0)  # a few KiB per rank
    return checkpoint.per_rank(states) if d.is_master else {}


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def teardown() -> None:
    """Destroy the process group (also under torchrun --nproc_per_node=1, where Dist.enabled is False).

    Call it once the model and optimizer are gone (train.py: after main() returns). Their DTensors hold the
    group, and while anything does, destroy_process_group only unlists it: its gloo worker threads live on
    into interpreter shutdown, where a thread that drops the last reference to a finished collective's tensor
    must take the GIL, cannot, and aborts the process ("terminate called without an active exception",
    SIGABRT) after a run that succeeded (pytorch/pytorch#109478): a fifth of two-rank FSDP runs on 2 CPU cores."""
    if dist.is_initialized():
        gc.collect()  # FSDP's modules and hooks form reference cycles: free them now, not at shutdown
        dist.destroy_process_group()
