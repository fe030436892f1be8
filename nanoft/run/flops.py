"""Model FLOPs utilisation (MFU): how much of the device's peak arithmetic the training step turns into
model maths. PaLM (Chowdhery et al. 2022, appendix B) defines it as

    MFU = (model FLOPs per token x tokens per second) / peak FLOPs per second

Model FLOPs per token of a GPT with N weights in its matmuls, L layers, context T and width C:

    forward            2 N         one multiply and one add per weight
    backward, inputs   2 N         the gradient flowing back through every matmul
    backward, weights  2 N_train   only for weights that train (LoRA skips the frozen base's)
    attention         12 L T C     QK^T and AV: 2 matmuls of 2 T C FLOPs per token per layer, forward, and
                                   twice that backward (over the full T x T square, as PaLM and nanoGPT count)

which for full training is the familiar 6 N + 12 L T C (nanoGPT's estimate_mfu). Recomputation (activation checkpointing) is not model maths: it lowers MFU,
which is the point of measuring it. N counts the tied head once (its matmul is a real 2 V C per token) and
leaves out the position embedding (a lookup, no FLOPs).
"""
from __future__ import annotations

import json
import os
import platform
import time

import torch
from torch import nn

from nanoft.data import tokens

# dense (no sparsity) tensor-core peaks in FLOP/s, from the vendors' datasheets, by the name
# torch.cuda.get_device_name reports; bf16/fp16 first, then tf32 (what fp32 matmuls use with allow_tf32)
NOMINAL_PEAK = {  # name fragment: (bf16/fp16, tf32)
    "H200": (989e12, 495e12), "H100 NVL": (835e12, 418e12), "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 495e12), "A100": (312e12, 156e12), "L40S": (362e12, 183e12), "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12), "A10": (125e12, 62.5e12), "RTX 4090": (165e12, 82.6e12), "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}
_measured: dict[tuple[str, torch.dtype], float] = {}


def flops_per_token(model: nn.Module, n_layer: int, block_size: int, n_embd: int) -> float:
    """Model FLOPs of one training step, per token (module docstring). `model` may hold LoRA adapters and
    NF4 weights: an NF4 weight is in*out multiply-adds like any other, and its weights never train."""
    matmul = trainable = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or name.endswith("wpe.weight") or p.dtype == torch.uint8:
            continue
        seen.add(id(p))
        matmul += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():  # NF4 linears hold their weight outside named_parameters
        if hasattr(m, "bits_per_param") and hasattr(m, "in_features"):
            matmul += m.in_features * m.out_features
    return 4 * matmul + 2 * trainable + 12 * n_layer * block_size * n_embd


def peak_flops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for matmuls in `dtype` on `device`. A GPU: the datasheet
    peak when its name is known, else a measured matmul. A CPU: measured (a 1024^3 matmul, the best of a few;
    CPUs differ too much for a table, and what matters is what torch gets), once per process, and kept in
    data/.cache/peak_flops.json as the best this machine has ever shown: a measurement taken while other
    programs share the cores comes out low, and would make MFU look high and differ between two runs."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for fragment, (half, tf32) in NOMINAL_PEAK.items():
            if fragment in name:
                return (half if dtype in (torch.bfloat16, torch.float16) else tf32), f"{fragment} datasheet"
    key = (device, dtype)
    if key not in _measured:
        _measured[key] = _best_ever(device, dtype, _measure_matmul(device, dtype))
    return _measured[key], "measured matmul"


def _best_ever(device: str, dtype: torch.dtype, measured: float) -> float:
    """The larger of `measured` and the best cached for this machine, torch and thread count; the cache updated
    (atomically, best effort: a read-only data folder only loses the memory)."""
    path = tokens.cache_dir() / "peak_flops.json"
    key = f"{_machine_name(device)} | {dtype} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    best = max(measured, float(cached.get(key, 0.0)))
    if best > cached.get(key, 0.0):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**cached, key: best}, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass
    return best


def _machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def _measure_matmul(device: str, dtype: torch.dtype, n: int = 1024, reps: int = 10, budget_s: float = 1.0) -> float:
    """The best of `reps` n x n matmuls, stopping once budget_s has passed after the first timed one: where the
    dtype is emulated (fp16 on most CPUs: 2 s a matmul) eleven of them would delay every run by 20 s."""
    gen = torch.Generator(device).manual_seed(0)  # its own generator: the run's RNG (dropout, resume) is untouched
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    best, start = float("inf"), time.perf_counter()
    for i in range(reps + 1):  # the first warms up (thread pool, kernels)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()  # .item(): the product has been computed when the clock stops
        took = time.perf_counter() - t0
        best = min(best, took) if i or took > budget_s else best  # a warm-up beyond the budget is the measurement
        if time.perf_counter() - start > budget_s and best < float("inf"):
            break
    return 2 * n**3 / best
