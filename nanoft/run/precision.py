"""Where and in what precision a run computes: the one rule for config "auto", used by train.py, LoRA's frozen
base (nanoft.peft.lora_model, via frozen_dtype) and sample.py alike, so that they never disagree.

    device "auto": CUDA if there is a GPU, else Apple's MPS, else the CPU.
    dtype "auto":  on CUDA, bf16 where the GPU has it natively (Ampere and newer): it keeps float32's range,
                   so it needs no loss scaling. Where bf16 would only be emulated (T4, V100: slower than
                   float32) fp16, with train.py's GradScaler.
                   On a CPU, bf16 where its instructions have bf16 dot products (x86: AVX512_BF16 or AMX,
                   Zen 4 and Sapphire Rapids onwards; Arm: the BF16 extension) and torch has oneDNN to use them:
                   on a 2-core AMD EPYC with AVX512_BF16, configs/tiny.py trained 1.27x faster under bf16
                   autocast on idle cores, and with the chunked loss no slower on loaded ones
                   (bench/bench_train.py), to the same loss. Only for models at least CPU_BF16_MIN_WIDTH wide:
                   at n_embd 32 the casts outweigh the faster multiplies (bf16 ran at 0.62x float32's speed,
                   side by side in bench/bench_train.py). Without them torch emulates bf16 by
                   converting to float32 and back, slower than float32 itself, so float32 there, and on MPS.
                   The rule reads the CPU's flags rather than timing a matmul at start-up: a timed choice could
                   differ between two runs on one machine (load, thermals), and a run and its resume must
                   compute alike.
    compile "auto": torch.compile (inductor; on a CPU it writes and builds C++ with gcc) costs a fixed time
                   up front, once for the training graph and once more for evaluation's (eval mode, no
                   gradients), and then saves a fraction of every step. So it pays only for a long enough run:
                   on a CPU it is used when the run's model maths (max_iters x FLOPs per step, nanoft.run.flops)
                   reach COMPILE_MIN_RUN_FLOPS, the break-even measured with bench/bench_train.py, for
                   pretraining and full fine-tuning (the graph measured). On a GPU, and for the other methods,
                   "auto" leaves it off (not measured here); --compile=True / False force either way anywhere.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch
from torch import nn

from nanoft.config import Config
from nanoft.run.flops import flops_per_token

# measured with bench/bench_train.py on configs/tiny.py (2-core AMD EPYC, shared with other jobs, so as ratios):
# compiling took as long as 27 eager steps (training graph, then eval's) and then saved a third of every step,
# so it repaid itself after 82 steps of 90 GFLOP, 7.4 TFLOP. The threshold leaves 2.7x of margin for that
# estimate; tiny's 300 steps (27 TFLOP) are above it, a few-step test run (< 1 TFLOP) far below
COMPILE_MIN_RUN_FLOPS = 20e12
CPU_BF16_MIN_WIDTH = 128  # configs/tiny.py's width, where bf16 was measured no slower (module docstring)


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def pick_dtype(name: str, device: str, n_embd: int = 0) -> torch.dtype:
    """The compute (autocast) dtype for config dtype `name`; n_embd: the model's width (the CPU rule needs it)."""
    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device == "cpu" and cpu_has_native_bf16() and n_embd >= CPU_BF16_MIN_WIDTH:
        return torch.bfloat16
    return torch.float32


def frozen_dtype(name: str, device: str) -> torch.dtype:
    """What LoRA / QLoRA store a frozen base in (and NF4 weights dequantize to): the compute dtype, except on a
    CPU under "auto", which keeps float32: autocast casts each matmul's weights to bf16 anyway, so bf16 storage
    would only save memory, and it would change LoRA on CPU, measured and tested in float32, beyond this rule's
    reach (the bf16 rule above was measured on pretraining)."""
    return torch.float32 if name == "auto" and device == "cpu" else pick_dtype(name, device)


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Does this CPU multiply bf16 in hardware, and can torch's oneDNN use it? Reads Linux's /proc/cpuinfo
    (`cpuinfo` replaces it in tests); other systems answer False, so they keep exact float32."""
    if not torch.backends.mkldnn.is_available():
        return False
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if platform.system() != "Linux" or not path.is_file():
            return False
        cpuinfo = path.read_text(errors="replace")
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def pick_compile(cfg: Config, model: nn.Module, device: str, measured: bool) -> bool:
    """Whether train.py compiles the model: cfg.compile when it is True or False, else the rule above. measured:
    whether the break-even was measured for this run's graph (the method's fact, nanoft.objectives)."""
    if cfg.compile != "auto":
        return cfg.compile
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    run_flops = cfg.max_iters * tokens_per_step * flops_per_token(model, cfg.n_layer, cfg.block_size, cfg.n_embd)
    return device == "cpu" and measured and run_flops >= COMPILE_MIN_RUN_FLOPS
