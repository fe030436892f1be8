"""python -m nanoft reward DIR --prompt P --response R [--response R2 ...]: score responses with a reward model
(a finetune=reward checkpoint; nanoft/objectives/reward.py trains it)."""
from __future__ import annotations

import argparse
import sys

import torch

from nanoft.data.sft import collate, fit_to_block, tokenize_examples
from nanoft.objectives.reward import load_reward_model, rewards
from nanoft.run import checkpoint


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
