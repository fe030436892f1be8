"""What a training run holds, counted exactly: the bytes of parameters, gradients and optimizer states, as
distinct tensor storages (a view or a tied weight counts once). train.py prints `measured_breakdown` once,
after its first optimizer step; the estimator that predicts these numbers before a run (and activations, and
the peak) is its own command, `python -m nanoft memory CONFIG`, which imports this module to check itself.

Under FSDP2 the parameters, their gradients and the optimizer states of a sharded model are DTensors: each
rank holds one shard of each, its local tensor, and that is what is counted here, so the numbers are this
rank's (a DTensor itself is a wrapper with no storage of its own).
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has no sharded tensors to count
    DTensor = None


def fmt(n: float) -> str:
    """Bytes in binary units: 512.0 KiB, 392.2 MiB, 2.48 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit in ("GiB", "TiB") else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def local(t: torch.Tensor) -> torch.Tensor:
    """The memory behind t on this rank: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _storage_bytes(tensors, seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` on this rank: a view or a tied weight counts once, a
    DTensor as its local shard's storage."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        st = local(t).untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _state_tensors(optimizer: torch.optim.Optimizer):
    def walk(v):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from walk(x)
    for state in optimizer.state.values():
        yield from walk(state)


def nf4_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors inside QLoRA's NF4 weights (nanoft.quant.nf4.NF4Tensor is neither a Parameter nor a buffer)."""
    out = []
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "state", None)
        if state is not None and hasattr(state, "packed"):
            out += [state.packed, state.absmax, state.offset, state.nested_absmax]
    return [t for t in out if t is not None]


def _is_paged(optimizer: torch.optim.Optimizer) -> bool:
    return getattr(type(optimizer), "paged", False)  # the optimizer table's fact (nanoft.optim)


def exact_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """{'params', 'grads', 'states', 'states_host'}: distinct storages of parameters and buffers (a QLoRA model's
    NF4 codes and scales included), of .grad, and of optimizer.state. A paged optimizer's states live in host
    memory: on a CUDA run that is every state tensor on the CPU; on a CPU run host and device are one memory,
    so its states are reported as host (what they would be on a GPU) and counted once in the total."""
    params = _storage_bytes(list(model.parameters()) + list(model.buffers()) + nf4_tensors(model))
    grads = _storage_bytes(p.grad for p in model.parameters())
    states = list(_state_tensors(optimizer)) if optimizer is not None else []
    if optimizer is not None and _is_paged(optimizer):
        host = [t for t in states if t.device.type == "cpu"]
        device = [t for t in states if t.device.type != "cpu"]
    else:
        host, device = [], states
    return {"params": params, "grads": grads, "states": _storage_bytes(device), "states_host": _storage_bytes(host)}


def measured_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """One block of text for train.py: the measured bytes of parameters, gradients (freed by zero_grad: then
    the bytes backward allocates, one per trainable parameter), optimizer states, and the CUDA peak so far."""
    got = exact_bytes(model, optimizer)
    if got["grads"] == 0:  # zero_grad(set_to_none) freed them; backward re-creates exactly these
        got["grads"] = sum(local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    sharded = DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())
    lines = ["memory (measured" + (", this rank's shards" if sharded else "") +
             "; the estimate and activations: python -m nanoft memory CONFIG [--measure])"]
    for key, label in (("params", "parameters"), ("grads", "gradients"), ("states", "optimizer states"),
                       ("states_host", "  in host memory")):
        if key != "states_host" or got[key]:
            lines.append(f"  {label:<18} {fmt(got[key]):>12}")
    if torch.cuda.is_available() and any(p.is_cuda for p in model.parameters()):
        lines.append(f"  {'peak so far':<18} {fmt(torch.cuda.max_memory_allocated()):>12}")
    return "\n".join(lines)
