"""The validation loss of any checkpoint: `python -m nanoft evaluate DIR`.

    python -m nanoft evaluate out/tiny                      # a full model, on its dataset's val split
    python -m nanoft evaluate out/tiny-gptq4                # a quantized one (python -m nanoft quantize)
    python -m nanoft evaluate out/lora                      # an adapter over the base it records: its SFT val pairs
    python -m nanoft evaluate out/lora --dataset=shakespeare    # ...or the language-model loss on a token dataset
    python -m nanoft evaluate gpt2 --dataset=shakespeare    # a GPT-2 (Hub name, folder, model.safetensors)
    python -m nanoft evaluate out/tiny-gptq4 --against out/tiny # also: how far its predictions are from another's

The model is loaded as sample.py loads it (nanoft.interop.pretrained.load_model: quantized layers stay quantized,
adapters are applied to their base). The batches are the ones train.py evaluates on (nanoft.run.evaluate): the val
split of the run's data, drawn with seed + 1 from position 0, so every call on every checkpoint of a run scores
the same rows. A run that trained on token files, and any run given --dataset, is scored by next-token loss on
token windows; a fine-tune on prompt/response pairs by its loss on the val pairs' responses; preference runs (DPO,
reward) by next-token loss on their dataset's tokens. The last line: `val loss X (perplexity Y)`.

--against REF adds, on the same batches, the mean per-token KL(REF || model) of the next-token distributions: how
far a quantized model is from its float original, a measure with far less noise than the difference of two val
losses (which a perturbation can move either way by more than the quantization's cost).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

import torch
import torch.nn.functional as F

from nanoft.config import Config
from nanoft.data.batches import make_batches
from nanoft.interop import hf
from nanoft.interop.pretrained import GPT2_SMALL, load_model
from nanoft.objectives import method_of
from nanoft.objectives.base import NextTokenLoss
from nanoft.run import checkpoint
from nanoft.run.distributed import Dist, check_device
from nanoft.run.evaluate import estimate_loss, loss_line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanoft evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a nanoft checkpoint dir (full, quantized or adapter), or a GPT-2")
    p.add_argument("--dataset", default="", help="score next-token loss on this dataset's val.bin (data/<name>)")
    p.add_argument("--eval_iters", type=int, default=0, help="val batches to average (default: the run's eval_iters)")
    p.add_argument("--batch_size", type=int, default=0, help="rows per batch (default: the run's batch_size)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="autocast dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--against", default="", help="a reference checkpoint: also print the mean KL(reference || model)")
    return p.parse_args(argv)


def run_config(source: str) -> Config:
    """The config the checkpoint was trained with (a GPT-2: GPT-2 small's, its shape from config.json)."""
    if hf.is_hf_source(source):
        return hf.resolve(dataclasses.replace(GPT2_SMALL, init_from=source), announce=False)
    return Config.from_dict(checkpoint.read_meta(source)["config"])


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.eval_iters < 0 or args.batch_size < 0:
        raise ValueError("--eval_iters and --batch_size must be >= 1")
    check_device(args.device)
    cfg = run_config(args.checkpoint)
    method = method_of(cfg)
    data = "tokens" if args.dataset or method.data != "sft" else "sft"  # module docstring: which loss is scored
    cfg = dataclasses.replace(cfg, dataset=args.dataset or cfg.dataset, eval_iters=args.eval_iters or cfg.eval_iters,
                              batch_size=args.batch_size or cfg.batch_size)
    model = load_model(args.checkpoint, args.device).to(args.device)
    if model.block_size < cfg.block_size:
        cfg = dataclasses.replace(cfg, block_size=model.block_size)
    _, val_batches, _ = make_batches(cfg, data, Dist(), args.device)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(torch.device(args.device).type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    loss = estimate_loss(NextTokenLoss(), model, val_batches, cfg.eval_iters, autocast)
    what = f"{cfg.eval_iters} x {cfg.batch_size} x {cfg.block_size}"
    print(f"{args.checkpoint}: {cfg.dataset if data == 'tokens' else 'the SFT val pairs'}, {what} (batches x rows x tokens)")
    if args.against:
        reference = load_model(args.against, args.device).to(args.device)
        kl = mean_kl(reference, model, val_batches, cfg.eval_iters, autocast)
        print(f"KL({args.against} || {args.checkpoint}) {kl:.6f} nats per token")
    print(loss_line(loss))


@torch.no_grad()
def mean_kl(reference, model, batches, eval_iters: int, autocast) -> float:
    """Mean over the val batches' tokens of KL(p_ref || p_model) = sum_v p_ref (log p_ref - log p_model), one row at a
    time (a row's logits are block_size x vocab floats)."""
    reference.eval(), model.eval()
    batches.load_state_dict({"position": 0})
    total, count = 0.0, 0
    for _ in range(eval_iters):
        x = batches.next()[0]
        for row in x.split(1):
            with autocast:
                log_p, log_q = (F.log_softmax(m(row).float(), dim=-1) for m in (reference, model))  # (1, T, vocab)
            total += (log_p.exp() * (log_p - log_q)).sum().item()
            count += row.numel()
    return total / count


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")
