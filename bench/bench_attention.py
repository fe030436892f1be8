"""Causal attention on the CPU under bf16 autocast: torch's SDPA on bf16 inputs against the same call in float32,
forward + backward, side by side (what nanoft/model/gpt.py's CPU_FLOAT32_ATTENTION_UP_TO was set from).

    python bench/bench_attention.py              # batch 16, 4 heads of 64, T = 64 .. 1024
    python bench/bench_attention.py --rounds 9

The two take turns (bf16, float32, bf16, ...) so a busy machine's drift falls on both; medians of the rounds.
Ratio = bf16's time / float32's (above 1: float32 is faster, and nanoft's rule uses it up to that T).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def fwd_bwd(q, k, v, upcast: bool) -> None:
    if upcast:
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y.sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=16 * 128, help="batch x T held about constant")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, 4 heads x 64, about {args.tokens} tokens per call, fwd + bwd")
    print(f"{'T':>5} {'batch':>5} {'bf16 ms':>8} {'fp32 ms':>8} {'bf16/fp32':>9}")
    for T in (64, 128, 256, 512, 1024):
        B = max(1, args.tokens // T)
        q, k, v = (torch.randn(B, 4, T, 64).bfloat16().requires_grad_() for _ in range(3))
        fns = {"bf16": lambda q=q, k=k, v=v: fwd_bwd(q, k, v, False), "fp32": lambda q=q, k=k, v=v: fwd_bwd(q, k, v, True)}
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"{T:>5} {B:>5} {1e3 * med['bf16']:8.2f} {1e3 * med['fp32']:8.2f} {med['bf16'] / med['fp32']:9.2f}")


if __name__ == "__main__":
    main()
