"""Where and in what precision a run computes: the one rule for config "auto", used by train.py, LoRA's frozen
base (nanoft.lora) and sample.py alike, so that they never disagree.

    device "auto": CUDA if there is a GPU, else Apple's MPS, else the CPU.
    dtype "auto":  on CUDA, bf16 where the GPU has it natively (Ampere and newer): it keeps float32's range,
                   so it needs no loss scaling. Where bf16 would only be emulated (T4, V100: slower than
                   float32) fp16, with train.py's GradScaler. Elsewhere float32: CPUs and MPS train it
                   exactly, and a CPU's bf16 matmuls are not reliably faster.
"""
from __future__ import annotations

import torch


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
