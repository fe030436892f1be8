"""Sampling speed of checkpoints side by side (float and quantized): tokens/s of GPT.generate with the KV cache.

    python bench/bench_quantized_sampling.py out/tiny out/tiny-rtn8 out/tiny-gptq4 out/tiny-nf4 --new_tokens=200
    python bench/bench_quantized_sampling.py out/tiny out/tiny-rtn8 out/tiny-gptq4 --dtype=bfloat16
    python bench/bench_quantized_sampling.py --config=configs/100m.py --new_tokens=20   # random weights, RTN in memory

Each checkpoint is loaded as sample.py loads it (quantized layers stay quantized). --config instead builds that
shape with random weights and quantizes its block Linears in memory by rounding (INT8, INT4 g128, NF4): speed and
size do not depend on the weights' values, so a model nobody trained can be timed. The models take turns for
--repeats rounds of --new_tokens greedy tokens after a one-token prompt; the median of each is reported, with its
ratio to the first checkpoint's, and its size on disk (the safetensors file). On a shared CPU read the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from nanoft.config import load_config
from nanoft.interop.pretrained import load_model
from nanoft.model import GPT
from nanoft.quant import Int4Linear, Int8Linear, Linear4bit

ROUNDING = {"int8": Int8Linear.from_linear, "int4-g128": lambda lin: Int4Linear.from_linear(lin, 128),
            "nf4": Linear4bit.from_linear}


def tokens_per_s(model, prompt: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    for token in model.generate(prompt, n, temperature=0):
        token.item()
    return n / (time.perf_counter() - start)


def random_models(config: str) -> dict:
    """{name: GPT} of the config's shape with random weights: float32, and its block Linears rounded per format."""
    cfg = load_config(config, ["--device=cpu", "--dropout=0.0"])
    models = {}
    for name in ("float32", *ROUNDING):
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        if name in ROUNDING:
            for block in model.blocks:
                for parent, attrs in ((block.attn, ("q_proj", "k_proj", "v_proj", "out_proj")), (block.mlp, ("fc_in", "fc_out"))):
                    for attr in attrs:
                        setattr(parent, attr, ROUNDING[name](getattr(parent, attr)))
        models[f"{config} {name}"] = model
    return models


def weight_bytes(model) -> int:
    """Bytes of the model's tensors, each storage once (the tied head): what its checkpoint would hold."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(seen.values())


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--config", default="", help="a config file: its shape, random weights, quantized in memory")
    p.add_argument("--new_tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16: under autocast, where torch's int8/int4 kernels run (nanoft.quant.int_linear.fast_path)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {c: load_model(c).eval() for c in args.checkpoints} if not args.config else random_models(args.config)
    prompt = torch.tensor([[198]])  # "\n"
    rates = {c: [] for c in models}
    with torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "bfloat16"):
        for _ in range(args.repeats):
            for c, model in models.items():
                rates[c].append(tokens_per_s(model, prompt, args.new_tokens))
    first = statistics.median(next(iter(rates.values())))
    print(f"CPU, {torch.get_num_threads()} threads, {args.dtype}, {args.new_tokens} greedy tokens, median of "
          f"{args.repeats} rounds")
    print(f"{'checkpoint':<40}{'MiB on disk':>12}{'tokens/s':>10}{'ratio':>8}")
    for c, model in models.items():
        files = list(Path(c).glob("ckpt-*.safetensors"))
        size = sum(f.stat().st_size for f in files) / 2**20 if files else weight_bytes(model) / 2**20
        rate = statistics.median(rates[c])
        print(f"{c:<40}{size:>12.2f}{rate:>10.1f}{rate / first:>8.2f}")


if __name__ == "__main__":
    main()
