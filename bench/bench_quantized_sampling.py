"""Sampling speed of checkpoints side by side (float and quantized): tokens/s of GPT.generate with the KV cache.

    python bench/bench_quantized_sampling.py out/tiny out/tiny-rtn8 out/tiny-gptq4 out/tiny-nf4 --new_tokens=200
    python bench/bench_quantized_sampling.py out/tiny out/tiny-rtn8 out/tiny-gptq4 --dtype=bfloat16

Each checkpoint is loaded as sample.py loads it (quantized layers stay quantized). The models take turns for
--repeats rounds of --new_tokens greedy tokens after a one-token prompt; the median of each is reported, with its
ratio to the first checkpoint's, and its size on disk (the safetensors file). On a shared CPU read the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from nanoft.interop.pretrained import load_model


def tokens_per_s(model, prompt: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    for token in model.generate(prompt, n, temperature=0):
        token.item()
    return n / (time.perf_counter() - start)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--new_tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16: under autocast, where torch's int8/int4 kernels run (nanoft.quant.int_linear.fast_path)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {c: load_model(c).eval() for c in args.checkpoints}
    prompt = torch.tensor([[198]])  # "\n"
    rates = {c: [] for c in models}
    with torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "bfloat16"):
        for _ in range(args.repeats):
            for c, model in models.items():
                rates[c].append(tokens_per_s(model, prompt, args.new_tokens))
    first = statistics.median(rates[args.checkpoints[0]])
    print(f"CPU, {torch.get_num_threads()} threads, {args.dtype}, {args.new_tokens} greedy tokens, median of "
          f"{args.repeats} rounds")
    print(f"{'checkpoint':<40}{'MiB on disk':>12}{'tokens/s':>10}{'ratio':>8}")
    for c in models:
        size = sum(f.stat().st_size for f in Path(c).glob("ckpt-*.safetensors")) / 2**20
        rate = statistics.median(rates[c])
        print(f"{c:<40}{size:>12.2f}{rate:>10.1f}{rate / first:>8.2f}")


if __name__ == "__main__":
    main()
