"""Generate text from a checkpoint, printing tokens as they are produced.

    python sample.py out/tiny --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8 --top_k 200 --seed 1
    python sample.py gpt2 --prompt "Hello, I'm a language model,"    # GPT-2 from the Hugging Face Hub (fetched once)
    python sample.py path/to/gpt2/model.safetensors --prompt "Hello, I'm a language model,"

The checkpoint is a nanoft out_dir (a full checkpoint, or a LoRA adapter, prefixes or adapter layers, which
are applied to their base), its best/ (the weights with the lowest validation loss: `--best`, or `out/tiny/best`), or a GPT-2
in Hugging Face layout: a Hub name (gpt2, gpt2-medium, distilgpt2, owner/name), a folder, a model.safetensors.
"""
import argparse
import codecs
import contextlib
import dataclasses
import sys
from pathlib import Path

import torch

from nanoft.config import Config
from nanoft.data.tokenizer import get_tokenizer
from nanoft.interop import hf
from nanoft.interop.pretrained import load_pretrained
from nanoft.model import GPT
from nanoft.objectives import method_of
from nanoft.objectives.reward import RewardModel
from nanoft.run import checkpoint, distributed
from nanoft.run.adapter_base import check_adapter_base

GPT2_SMALL = Config(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, dropout=0.0)


def load_model(source: str, device: str = "cpu") -> GPT:
    if hf.is_hf_source(source):  # a GPT-2 by name (fetched once), a folder or a model.safetensors
        cfg = hf.resolve(dataclasses.replace(GPT2_SMALL, init_from=source), announce=False)  # config.json: the shape
        return load_pretrained(cfg, cfg.init_from)
    ckpt = checkpoint.load(source)
    cfg = dataclasses.replace(Config.from_dict(ckpt.config), dropout=0.0, gradient_checkpointing=False)
    method = method_of(cfg)
    if method.objective is RewardModel:
        raise ValueError(f"{source} is a reward model: it scores text (python -m nanoft reward), it does not write it")
    peft = method.peft(cfg)
    if not peft:
        model = GPT(cfg)
        heads = method.objective.head_shapes(cfg.n_embd)  # PPO's value head: the critic, not part of the policy
        checkpoint.load_weights(model, {k: v for k, v in ckpt.model.items() if k not in heads}, source)
        return model
    check_adapter_base(ckpt, source)  # the very base it was trained on, by content
    # LoRA/QLoRA adapters, folded prefixes or adapter layers: applied to their base (QLoRA quantizes on the device)
    model = peft.apply(load_pretrained(cfg, ckpt.base_from), cfg, device, for_training=False)
    peft.load(model, ckpt.model, {})
    return model


def check_args(args) -> None:
    """One line for a value that cannot work, before the model is loaded."""
    for ok, what in ((args.prompt != "", "--prompt must not be empty (the default is a newline)"),
                     (args.max_new_tokens >= 1, f"--max_new_tokens must be at least 1; got {args.max_new_tokens}"),
                     (0 <= args.temperature < float("inf"), f"--temperature must be >= 0; got {args.temperature}"),
                     (args.top_k >= 0, f"--top_k must be >= 1 (or 0: all tokens); got {args.top_k}")):
        if not ok:
            raise ValueError(what)
    distributed.check_device(args.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a nanoft out_dir, or a GPT-2: a Hub name, a folder, a model.safetensors")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--best", action="store_true", help="the checkpoint's best/ (lowest validation loss), not its latest")
    args = p.parse_args()
    check_args(args)
    if args.best:
        args.checkpoint = str(Path(args.checkpoint) / checkpoint.BEST_DIR)

    enc = get_tokenizer()
    model = load_model(args.checkpoint, args.device).to(args.device).eval()
    # a LoRA model keeps its frozen base in bf16 on CUDA beside float32 adapters: run it under autocast, as it trained
    low = {p.dtype for p in model.parameters()} - {torch.float32}
    autocast = torch.autocast(torch.device(args.device).type, low.pop()) if low else contextlib.nullcontext()
    idx = torch.tensor([enc.encode(args.prompt, allowed_special={"<|endoftext|>"})], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two tokens
    with autocast:
        for token in model.generate(idx, args.max_new_tokens, args.temperature, args.top_k or None, generator=gen):
            t = token.item()
            if t < enc.n_vocab:  # a padded vocabulary has ids no text maps to
                sys.stdout.write(utf8.decode(enc.decode_single_token_bytes(t)))
                sys.stdout.flush()  # stream: show each token as soon as it exists
    sys.stdout.write("\n")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")
