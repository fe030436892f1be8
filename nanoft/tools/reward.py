"""python -m nanoft reward DIR --prompt P --response R [--response R2 ...]: score responses with a reward model
(a finetune=reward checkpoint; nanoft/objectives/reward.py trains it)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from nanoft.config import Config
from nanoft.data.sft import collate, fit_to_block, tokenize_examples
from nanoft.model import GPT
from nanoft.objectives import method_of
from nanoft.objectives.reward import RewardModel, add_reward_head, rewards
from nanoft.run import checkpoint


def load_reward_model(source: str, device: str = "cpu") -> GPT:
    """A finetune="reward" checkpoint as a GPT with its reward_head, in eval mode."""
    ckpt = checkpoint.load(source)
    cfg = dataclasses.replace(Config.from_dict(ckpt.config), dropout=0.0, gradient_checkpointing=False)
    if method_of(cfg).objective is not RewardModel:
        raise ValueError(f"{source} holds a finetune={cfg.finetune!r} run, not a reward model")
    model = add_reward_head(GPT(cfg))
    checkpoint.load_weights(model, ckpt.model, source)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanoft reward", description="score a response with a reward model")
    p.add_argument("checkpoint", help="out_dir of a finetune=reward run")
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", required=True, action="append", help="repeat to compare several")
    args = p.parse_args(argv)
    model = load_reward_model(args.checkpoint)
    examples = tokenize_examples([{"prompt": args.prompt, "response": r} for r in args.response])
    rows = [fit_to_block(ex, model.block_size) for ex in examples]
    if any(r is None for r in rows):
        raise ValueError(f"a response does not fit the model's block_size={model.block_size}")
    x, _, mask = collate(rows, model.block_size)
    with torch.no_grad():
        for response, r in zip(args.response, rewards(model, x, mask).tolist()):
            print(f"{r:+.4f}  {response!r}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")
