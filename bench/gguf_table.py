"""A run exported to GGUF as f16, q8_0 and q4_0, each scored: the README's GGUF table.

    python bench/gguf_table.py out/tiny --to out/gguf [--eval_iters=20]

For each type: `python -m nanoft export RUN --to DIR/<run>-<type>.gguf --type <type>` (in-process), then
  size        the file on disk (the float row: the model's float32 weights, each tensor once; the run's checkpoint
              holds more, its optimizer state)
  val loss    nanoft's GPT on the file's weights (nanoft.interop.gguf.load_gguf, dequantized to float32), mean
              next-token loss over the run's val split: the same eval_iters batches as train.py's evaluation
              (seed + 1, batch_size x block_size), and perplexity = exp(val loss)
  logit diff  transformers' GPT2LMHeadModel loaded from the GGUF (from_pretrained(gguf_file=...), the gguf package
              dequantizing) against nanoft's float model on the first val batch: max and mean |difference| over
              all 50,257 logits of every position
The row "float, 50,257 logits" is the run's float model with its vocabulary cut to GPT-2's 50,257 tokens, as every
GGUF has it: the part of any difference that comes from dropping the padded rows, not from the type.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import sample
from nanoft.data.corpus import ensure_dataset
from nanoft.data.tokens import Batches
from nanoft.interop.gguf import GPT2_VOCAB, TYPES, load_gguf
from nanoft.run import checkpoint
from nanoft.tools.export import export_gguf


@torch.no_grad()
def val_loss(model, batches: Batches, eval_iters: int, cut: bool = False) -> float:
    """Mean next-token loss over the same eval_iters val batches (train.py's estimate_loss, in float32)."""
    batches.load_state_dict({"position": 0})
    total = 0.0
    for _ in range(eval_iters):
        x, y = batches.next()
        if cut:  # the full logits, restricted to GPT-2's tokens
            total += F.cross_entropy(model(x)[..., :GPT2_VOCAB].flatten(0, 1), y.flatten()).item()
        else:
            total += model(x, y).item()
    return total / eval_iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--to", required=True, help="folder for the .gguf files")
    p.add_argument("--eval_iters", type=int, default=None, help="val batches (default: the run's eval_iters)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM  # a reference only, like the tests'

    torch.manual_seed(0)
    model = sample.load_model(args.run).eval()
    cfg = model.cfg
    eval_iters = args.eval_iters or cfg.eval_iters
    batches = Batches(ensure_dataset(cfg.dataset) / "val.bin", cfg.batch_size, cfg.block_size, cfg.seed + 1, "cpu")
    x, _ = batches.next()
    with torch.no_grad():
        reference = model(x)[..., :GPT2_VOCAB]
    weights = sum(4 * p.numel() for p in model.parameters())  # a tied head is wte: counted once
    rows = [("float32 (nanoft)", weights, val_loss(model, batches, eval_iters), None),
            ("float, 50,257 logits", None, val_loss(model, batches, eval_iters, cut=True), None)]
    out = Path(args.to)
    out.mkdir(parents=True, exist_ok=True)
    for type in TYPES:
        t0 = time.perf_counter()
        path = export_gguf(args.run, str(out / f"{Path(args.run).resolve().name}-{type}.gguf"), type, overwrite=True)
        print(f"{type}: exported in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        loss = val_loss(load_gguf(path), batches, eval_iters)
        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
        with torch.no_grad():
            diff = (theirs(x).logits - reference).abs()
        rows.append((f"GGUF {type}", path.stat().st_size, loss, (diff.max().item(), diff.mean().item())))
    print(f"\n{args.run} (step {checkpoint.read_meta(args.run)['step']}), val loss over {eval_iters} batches of "
          f"{cfg.batch_size} x {cfg.block_size} tokens; logit differences on the first batch, via transformers\n")
    print("| weights | size on disk | val loss | perplexity | max / mean logit diff vs nanoft float |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, size, loss, diff in rows:
        size_s = f"{size / 2**20:.1f} MiB" if size else ""
        diff_s = f"{diff[0]:.2e} / {diff[1]:.2e}" if diff else ""
        print(f"| {name} | {size_s} | {loss:.4f} | {math.exp(loss):.2f} | {diff_s} |")


if __name__ == "__main__":
    main()
