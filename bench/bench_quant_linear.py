"""Speed of the quantized Linear layers against the float nn.Linear they replace, on the CPU: ratios side by side.

    python bench/bench_quant_linear.py                        # configs/tiny.py's and configs/100m.py's layer shapes
    python bench/bench_quant_linear.py --threads=1 --rows=1,128 --dtypes=bfloat16

For each layer shape (in -> out) and number of rows M (1: a sampled token; 128: a prompt), every variant runs in
turn (float, int8 fast, int8 reference, int4 fast, int4 reference, nf4) for --repeats rounds, and the median time of
each is reported as a ratio to the float Linear's (> 1: slower). Fast paths are torch's weight-only kernels
(`torch._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); the references dequantize the whole weight and
multiply (nanoft/quant/int_linear.py). Before timing, each variant's output is compared with its reference.
On a shared CPU read the ratios, not the absolute times.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from nanoft.quant import Int4Linear, Int8Linear, Linear4bit

SHAPES = {"tiny attn (128 -> 128)": (128, 128), "tiny fc_in (128 -> 512)": (128, 512),
          "100m attn (768 -> 768)": (768, 768), "100m fc_in (768 -> 3072)": (768, 3072),
          "100m fc_out (3072 -> 768)": (3072, 768)}


def median_seconds(fn, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,128", help="comma-separated M (rows of x)")
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtypes", default="float32,bfloat16", help="activation dtypes (bfloat16: under autocast)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} threads; int4 group {args.group_size}; median of {args.repeats} alternating "
          f"rounds; time relative to nn.Linear in the same dtype (lower is faster); 'int8', 'int4': what forward runs")
    print(f"{'layer':<28}{'dtype':>9}{'M':>5}{'float us':>10}{'int8':>8}{'int8 ref':>10}{'int4':>8}{'int4 ref':>10}{'nf4':>8}")
    for dtype in args.dtypes.split(","):
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
            run_shapes(args, dtype)


@torch.no_grad()
def run_shapes(args, dtype: str) -> None:
    for label, (n_in, n_out) in SHAPES.items():
        lin = nn.Linear(n_in, n_out)
        int8, int4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, args.group_size)
        nf4 = Linear4bit.from_linear(lin)
        variants = {"float": lin, "int8": int8, "int8 ref": int8.forward_reference, "int4": int4,
                    "int4 ref": int4.forward_reference, "nf4": nf4}
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, n_in)
            tol = 0.05 if dtype == "bfloat16" else 1e-4
            for layer in (int8, int4):
                ref = layer.forward_reference(x).float()
                assert (layer(x).float() - ref).abs().max() <= tol * ref.abs().max(), label
            calls = max(5, int(2e7 / (m * n_in * n_out)))  # ~2e7 multiply-adds a measurement
            times = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    fn(x)  # warm: the int4 kernel's packed copy is built at the first call
                    times[name].append(median_seconds(fn, x, calls))
            med = {name: statistics.median(t) for name, t in times.items()}
            ratios = "".join(f"{med[n] / med['float']:>{w}.2f}" for n, w in
                             (("int8", 8), ("int8 ref", 10), ("int4", 8), ("int4 ref", 10), ("nf4", 8)))
            print(f"{label:<28}{dtype:>9}{m:>5}{1e6 * med['float']:>10.1f}{ratios}")


if __name__ == "__main__":
    main()
