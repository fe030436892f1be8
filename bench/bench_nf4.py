"""Benchmark NF4 dequantize against bitsandbytes, on the same packed weights.

    python bench/bench_nf4.py            # CPU: our PyTorch reference vs bitsandbytes' CPU dequantize
                                         # CUDA (when present): our Triton kernel vs bitsandbytes' CUDA kernel

Tensors: one 4096x4096 weight, and every 2-D weight of the 100M-parameter GPT (configs/100m.py: 9 layers of
width 768, plus the 50257x768 embedding), quantized at blocksize 64 with and without double quantization.
Before timing it checks that our packed bytes, absmax (nested absmax, offset) and dequantized output are
identical to bitsandbytes' on CPU. Reported: time per full dequantize of the set, throughput in GB/s of
bytes moved (packed codes + absmax read, output written), and ratio = bitsandbytes time / our time (above
1: we are faster). On CUDA also the fraction of the device's memory bandwidth: the nominal peak when
the device name is known, and a measured device-to-device copy. Timings on a shared machine are noisy:
each figure is the best of several runs (the run least disturbed by other processes).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bitsandbytes.functional as bnbF  # noqa: E402

from nanoft.config import load_config  # noqa: E402
from nanoft.kernels import dequantize_nf4, quantize_nf4  # noqa: E402
from nanoft.model import GPT  # noqa: E402

NOMINAL_GBPS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "H200": 4800,
                "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935,
                "L4": 300, "A10G": 600, "RTX 4090": 1008}


def best_time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: Triton compile, allocator, caches
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()  # a CPU-GPU sync point, outside the timed region's start
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def weight_sets(device: str) -> dict[str, list[torch.Tensor]]:
    torch.manual_seed(0)
    big = torch.randn(4096, 4096, device=device) * 0.02
    model = GPT(load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "100m.py"), []))
    weights = [p.detach().to(device) for p in model.parameters() if p.dim() == 2]
    del model
    return {"4096x4096": [big], f"100M model ({len(weights)} weights)": weights}


def bytes_moved(states, out_bytes: int) -> int:
    total = 0
    for q in states:
        total += q.packed.numel() + q.absmax.numel() * q.absmax.element_size() + q.numel * out_bytes
        if q.double_quant:
            total += q.nested_absmax.numel() * 4
    return total


def check_identical(weights, ours, theirs) -> str:
    """Same packed bytes / absmax / nested absmax / offset, and same dequantized output, as bitsandbytes."""
    for w, q, (packed, state) in zip(weights, ours, theirs):
        same = torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
        if q.double_quant:
            same = same and torch.equal(q.nested_absmax, state.state2.absmax) and torch.equal(q.offset, state.offset)
        same = same and torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(packed, state))
        if not same:
            return "DIFFERENT"
    return "identical"


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "triton" if device == "cuda" else "torch"
    repeats = 10 if device == "cuda" else 3
    out_dtype = torch.bfloat16  # QLoRA's usual compute dtype
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, threads {torch.get_num_threads()}, "
          f"ours: {backend} backend, output {out_dtype}, blocksize 64, best of {repeats} runs")
    copy_gbps = None
    if device == "cuda":
        buf = torch.empty(1 << 28, dtype=torch.uint8, device=device)
        t = best_time(lambda: buf.clone(), device, repeats)
        copy_gbps = 2 * buf.numel() / t / 1e9
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in NOMINAL_GBPS.items() if k in name), None)
        print(f"measured device copy: {copy_gbps:.0f} GB/s; nominal peak: {peak or 'unknown'} GB/s")
    header = (f"{'weights':>26} {'dq':>3} {'check':>9} {'ours ms':>9} {'bnb ms':>9} {'ours GB/s':>9} "
              f"{'bnb GB/s':>9} {'ratio':>6}")
    print(header + ("  ours %copy  ours %peak" if device == "cuda" else ""))
    for name, weights in weight_sets(device).items():
        for dq in (False, True):
            ours = [quantize_nf4(w, 64, dq, backend=backend) for w in weights]
            theirs = [bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4") for w in weights]
            check = check_identical(weights, ours, theirs) if device == "cpu" else "cpu-only"
            for _, state in theirs:
                state.dtype = out_dtype
            t_ours = best_time(lambda: [dequantize_nf4(q, out_dtype, backend=backend) for q in ours], device, repeats)
            t_bnb = best_time(lambda: [bnbF.dequantize_4bit(p, s) for p, s in theirs], device, repeats)
            gb = bytes_moved(ours, 2) / 1e9
            line = (f"{name:>26} {'yes' if dq else 'no':>3} {check:>9} {1e3 * t_ours:9.2f} {1e3 * t_bnb:9.2f} "
                    f"{gb / t_ours:9.2f} {gb / t_bnb:9.2f} {t_bnb / t_ours:6.2f}")
            if device == "cuda":
                peak = next((v for k, v in NOMINAL_GBPS.items() if k in torch.cuda.get_device_name()), None)
                line += f"  {100 * gb / t_ours / copy_gbps:9.1f}%"
                line += f"  {100 * gb / t_ours / peak:9.1f}%" if peak else "        n/a"
            print(line)
            del ours, theirs
    print("ratio = bitsandbytes time / our time (above 1: ours is faster)")


if __name__ == "__main__":
    main()
