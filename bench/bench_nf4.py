"""Benchmark NF4: ours against bitsandbytes and against our own PyTorch reference, side by side in one run.

    python bench/bench_nf4.py            # CUDA: dequantize, our Triton kernel vs bitsandbytes' CUDA kernel vs our
                                         #   reference. CPU: dequantize and quantize, our C kernel (backend="auto",
                                         #   kernels/nf4_cpu.py) vs bitsandbytes' CPU kernels vs our reference
    python bench/bench_nf4.py --sweep    # CUDA: also time the kernel's tile sizes (DEQUANT_BYTES x DEQUANT_WARPS)
    python bench/bench_nf4.py --repeats 9  # CPU: timing rounds (default 5)

Tensors (bfloat16, QLoRA's usual dtype, quantized at blocksize 64 with and without double quantization): one
4096x4096 weight, and every 2-D weight of the 100M-parameter GPT (configs/100m.py). Before timing, it checks
that both libraries agree bit for bit: on CPU the quantized state and the output (ours, bitsandbytes' and our
reference's); on CUDA the output of ours and of bitsandbytes' kernel on the same packed weights (bitsandbytes'
CUDA quantizer differs from its CPU one in rare elements, see kernels/nf4.py, so the packed bytes are not
compared there), and our kernel against our reference.

Timing: medians. On CUDA triton.testing.do_bench (CUDA events, L2 flushed between runs): ms per dequantize of
the whole set; GB/s of bytes that must move (packed codes, absmax and its nested form read once, output written
once); the fraction of a measured device-to-device copy's GB/s and of the device's nominal HBM peak. On CPU the
three contenders are timed in interleaved rounds (ours, bitsandbytes, reference, ours, ...) so that a busy
machine's drift falls on all of them alike, each round one pass over the whole set; wall clock and CPU time
(all threads of the process) both, because on a machine shared with other work an OpenMP kernel such as
bitsandbytes' waits for its descheduled threads: its wall time then grows while its CPU time does not.
Ratios = their time / our time (above 1: ours is faster).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # after site-packages: never shadow HF `kernels`
from nanoft.config import load_config
from nanoft.kernels import (
    NF4State,
    dequantize_nf4,
    nf4_cpu,
    quantize_nf4,
)
from nanoft.kernels import nf4 as nf4_module
from nanoft.model.gpt import GPT

try:
    import bitsandbytes.functional as bnbF
except Exception as e:  # noqa: BLE001  (not installed, or built without this device's backend)
    bnbF, BNB_ERROR = None, e

# nominal HBM bandwidth, GB/s, by a substring of torch.cuda.get_device_name() (first match wins)
NOMINAL_GBPS = {"H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "H200": 4800, "GH200": 4000,
                "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935,
                "L40S": 864, "L4": 300, "A10G": 600, "RTX 4090": 1008}
OUT = torch.bfloat16


def timer():
    """fn -> median seconds per call on CUDA."""
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def rounds(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: fn} -> {name: (median wall seconds, median CPU seconds)}, timed in interleaved rounds."""
    for fn in fns.values():
        fn()  # warm-up: builds the C kernel, the tables, the allocator's free lists
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def weight_sets(device: str) -> dict[str, list[torch.Tensor]]:
    torch.manual_seed(0)
    big = (torch.randn(4096, 4096) * 0.02).to(device, OUT)
    model = GPT(load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "100m.py"), []))
    weights = [p.detach().to(device, OUT) for p in model.parameters() if p.dim() == 2]
    del model
    return {"4096x4096": [big], f"100M model ({len(weights)} weights)": weights}


def bytes_moved(states: list[NF4State], out_bytes: int) -> int:
    total = 0
    for q in states:
        total += q.packed.numel() + q.absmax.numel() * q.absmax.element_size() + q.numel * out_bytes
        if q.double_quant:
            total += q.nested_absmax.numel() * 4 + 256 * 4  # nested absmax and the 8-bit code table
    return total


def from_bnb(packed: torch.Tensor, state) -> NF4State:
    """bitsandbytes' quantized weight as our NF4State (the same format), to run our kernel on its bytes."""
    return NF4State(packed=packed.view(-1), absmax=state.absmax, shape=state.shape, dtype=OUT,
                    blocksize=state.blocksize, offset=state.offset if state.nested else None,
                    nested_absmax=state.state2.absmax if state.nested else None)


def check(ours, theirs, backend: str) -> str:
    """CPU: identical state and output. CUDA: same output on the same packed bytes; kernel == reference."""
    for q, (packed, state) in zip(ours, theirs):
        if backend != "triton":
            same = torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
            if q.double_quant:
                same = same and torch.equal(q.nested_absmax, state.state2.absmax) and torch.equal(q.offset, state.offset)
            if not same:
                return "STATE DIFFERS"
            q_theirs = q
        else:
            q_theirs = from_bnb(packed, state)
            if not torch.equal(dequantize_nf4(q, OUT, backend="triton"), dequantize_nf4(q, OUT, backend="torch")):
                return "KERNEL != REF"
        if not torch.equal(dequantize_nf4(q_theirs, OUT, backend=backend).view(-1),
                           bnbF.dequantize_4bit(packed, state).view(-1)):
            return "OUTPUT DIFFERS"
    return "identical"


def sweep(weights, measure) -> None:
    """Time the Triton kernel's tile choices on the first set (the wrapper reads these module constants)."""
    states = [quantize_nf4(w, 64, False) for w in weights]
    gb = bytes_moved(states, 2) / 1e9
    saved = nf4_module.DEQUANT_BYTES, nf4_module.DEQUANT_WARPS
    print("\nsweep (no double quant): bytes/program x warps -> GB/s")
    for nbytes in (2048, 4096, 8192, 16384):
        for warps in (2, 4, 8, 16):
            nf4_module.DEQUANT_BYTES, nf4_module.DEQUANT_WARPS = nbytes, warps
            t = measure(lambda: [dequantize_nf4(q, OUT, backend="triton") for q in states])
            print(f"  {nbytes:>6} x {warps:>2}: {gb / t:8.1f}" + ("   (current)" if (nbytes, warps) == saved else ""))
    nf4_module.DEQUANT_BYTES, nf4_module.DEQUANT_WARPS = saved


def same_state(a: NF4State, b: NF4State) -> bool:
    return all((getattr(a, k) is None and getattr(b, k) is None) or torch.equal(getattr(a, k), getattr(b, k))
               for k in ("packed", "absmax", "offset", "nested_absmax"))


def cpu_main(sets: dict, repeats: int) -> None:
    """Dequantize and quantize on the CPU: our C kernel vs bitsandbytes vs our reference, one table."""
    print(f"{'weights':>26} {'dq':>3} {'op':>6} {'check':>10} | wall ms: {'ours':>7} {'bnb':>8} {'ref':>8} "
          f"{'bnb/ours':>8} {'ref/ours':>8} | CPU ms: {'ours':>7} {'bnb':>8} {'ref':>8} {'bnb/ours':>8} {'ref/ours':>8}")
    for label, weights in sets.items():
        for dq in (False, True):
            ours = [quantize_nf4(w, 64, dq, backend="auto") for w in weights]
            ref = [quantize_nf4(w, 64, dq, backend="torch") for w in weights]
            status = "identical" if all(map(same_state, ours, ref)) else "REF DIFFERS"
            theirs = None
            if bnbF is not None:
                theirs = [bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4") for w in weights]
                if check(ours, theirs, "auto") != "identical":
                    status = "BNB DIFFERS"
            if not all(torch.equal(dequantize_nf4(q, OUT), dequantize_nf4(q, OUT, backend="torch")) for q in ours):
                status = "REF DIFFERS"
            contenders = {
                "dequant": {"ours": lambda: [dequantize_nf4(q, OUT) for q in ours],
                            "ref": lambda: [dequantize_nf4(q, OUT, backend="torch") for q in ours]},
                "quant": {"ours": lambda: [quantize_nf4(w, 64, dq) for w in weights],
                          "ref": lambda: [quantize_nf4(w, 64, dq, backend="torch") for w in weights]},
            }
            if theirs is not None:
                contenders["dequant"]["bnb"] = lambda: [bnbF.dequantize_4bit(p, st) for p, st in theirs]
                contenders["quant"]["bnb"] = lambda: [bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq,
                                                                         quant_type="nf4") for w in weights]
            for op, fns in contenders.items():
                t = rounds(fns, repeats)
                line = f"{label:>26} {'yes' if dq else 'no':>3} {op:>6} {status:>10} |"
                for i, unit in ((0, "wall ms:"), (1, "CPU ms:")):
                    ms = {k: f"{1e3 * v[i]:8.1f}" for k, v in t.items()}
                    ratio = {k: f"{v[i] / t['ours'][i]:8.2f}" for k, v in t.items()}
                    line += (f" {unit} {ms['ours']:>7} {ms.get('bnb', 'n/a'):>8} {ms['ref']:>8} "
                             f"{ratio.get('bnb', 'n/a'):>8} {ratio['ref']:>8} |")
                print(line.rstrip(" |"), flush=True)
            del ours, ref, theirs
    print("bnb/ours, ref/ours: their median time / ours (above 1: ours is faster)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="CUDA: time the kernel's tile sizes too")
    parser.add_argument("--repeats", type=int, default=5, help="CPU: timing rounds (the median is reported)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if bnbF is None:
        print(f"bitsandbytes unavailable ({BNB_ERROR!r}): its columns are n/a")
    if device == "cpu":
        print(f"device: CPU, threads {torch.get_num_threads()}, ours: the C kernel of kernels/nf4_cpu.py "
              f"(built: {nf4_cpu.available()}), output {OUT}, blocksize 64, median of {args.repeats} rounds")
        cpu_main(weight_sets(device), args.repeats)
        return
    backend = "triton"
    measure = timer()
    name = torch.cuda.get_device_name()
    print(f"device: {name}, ours: {backend} backend, output {OUT}, blocksize 64, median times")
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() / measure(lambda: dst.copy_(src)) / 1e9
    del src, dst
    peak = next((v for k, v in NOMINAL_GBPS.items() if k in name), None)
    print(f"measured device-to-device copy: {copy_gbps:.0f} GB/s; nominal HBM peak: {peak or 'unknown'} GB/s")
    print(f"{'weights':>26} {'dq':>3} {'check':>14} {'ours ms':>8} {'ours GB/s':>9} {'bnb ms':>8} {'bnb/ours':>8}"
          f" {'ref ms':>8} {'ref/ours':>8} {'%copy':>6} {'%peak':>6}")
    sets = weight_sets(device)
    for label, weights in sets.items():
        for dq in (False, True):
            ours = [quantize_nf4(w, 64, dq, backend=backend) for w in weights]
            gb = bytes_moved(ours, 2) / 1e9
            t_ours = measure(lambda: [dequantize_nf4(q, OUT, backend=backend) for q in ours])
            status, t_bnb = "no bnb", None
            if bnbF is not None:
                theirs = [bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4") for w in weights]
                status = check(ours, theirs, backend)
                t_bnb = measure(lambda: [bnbF.dequantize_4bit(p, s) for p, s in theirs])
                del theirs
            line = f"{label:>26} {'yes' if dq else 'no':>3} {status:>14} {1e3 * t_ours:8.3f} {gb / t_ours:9.1f} "
            line += f"{1e3 * t_bnb:8.3f} {t_bnb / t_ours:8.2f}" if t_bnb else f"{'n/a':>8} {'n/a':>8}"
            t_ref = measure(lambda: [dequantize_nf4(q, OUT, backend="torch") for q in ours])
            line += f" {1e3 * t_ref:8.3f} {t_ref / t_ours:8.2f} {100 * gb / t_ours / copy_gbps:5.1f}%"
            line += f" {100 * gb / t_ours / peak:5.1f}%" if peak else f" {'n/a':>6}"
            print(line)
            del ours
    print("bnb/ours, ref/ours: their median time / ours (above 1: ours is faster); %copy, %peak: our GB/s as a "
          "fraction of the measured copy and of the nominal HBM bandwidth")
    if args.sweep:
        sweep(sets["4096x4096"], measure)


if __name__ == "__main__":
    main()
