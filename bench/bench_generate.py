"""Sampling speed with and without the KV cache: tokens/s of GPT.generate, and their ratio, side by side.

    python bench/bench_generate.py                                  # configs/tiny.py's shape, random weights
    python bench/bench_generate.py --block_size=1024                # a GPT-2-sized window: 1,000 tokens all cached
    python bench/bench_generate.py --config=configs/100m.py --device=cuda

use_cache=False is the reference: each token recomputes the whole cropped window (up to block_size
positions). With the cache each token is one position's forward while the sequence fits in block_size;
after that the window slides, every key and value changes with its position, and the cached path recomputes
the window too (so the same tokens come out). The gain is therefore largest while the sequence fits: with
configs/tiny.py's block_size of 128, 1,000 new tokens are mostly past it.

The two paths take turns (cached, uncached, cached, ...) for --repeats rounds and the median of each is
reported, so that a busy machine slows both alike: read the ratio, not the absolute numbers, on a shared CPU.
Before timing, the greedy tokens of both paths are compared (they must be identical).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from nanoft.config import load_config
from nanoft.model.gpt import GPT


def tokens_per_s(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool) -> float:
    start = time.perf_counter()
    for token in model.generate(prompt, n, temperature=0, use_cache=use_cache):
        token.item()  # as sample.py does for each token: on a GPU this waits for it
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.py", help="the model shape (weights are random)")
    p.add_argument("--new_tokens", default="200,1000", help="comma-separated numbers of tokens to generate")
    p.add_argument("--block_size", type=int, default=None, help="override the config's context window")
    p.add_argument("--prompt_len", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    cfg = dataclasses.replace(cfg, dropout=0.0, block_size=args.block_size or cfg.block_size)
    torch.manual_seed(0)
    model = GPT(cfg).to(args.device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=args.device)
    counts = [int(n) for n in args.new_tokens.split(",")]
    print(f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, block_size {cfg.block_size}, prompt {args.prompt_len} token(s), "
          f"{args.device}, {torch.get_num_threads()} threads; median of {args.repeats} alternating runs")

    check = min(counts[-1], 2 * cfg.block_size)  # past block_size: the sliding part is compared too
    same = [t.item() for t in model.generate(prompt, check, temperature=0)] == \
           [t.item() for t in model.generate(prompt, check, temperature=0, use_cache=False)]
    print(f"greedy tokens identical over {check} tokens: {same}")
    print(f"{'new tokens':>10} {'cached tok/s':>13} {'uncached tok/s':>15} {'cached / uncached':>18}")
    for n in counts:
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for use_cache in (True, False):
                runs[use_cache].append(tokens_per_s(model, prompt, n, use_cache))
        cached, uncached = statistics.median(runs[True]), statistics.median(runs[False])
        print(f"{n:>10} {cached:>13.1f} {uncached:>15.1f} {cached / uncached:>17.2f}x")


if __name__ == "__main__":
    main()
