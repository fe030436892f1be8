"""Validation loss: the one number train.py logs at each evaluation, `python -m nanoft evaluate` prints for any
checkpoint, and `python -m nanoft quantize` reports before and after rounding."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def estimate_loss(objective, model, batches, eval_iters: int, autocast) -> float:
    """Mean loss over the same eval_iters validation batches every time, so evaluations compare: the batches
    restart at position 0 (they depend on the seed and the position only, nanoft.data.tokens.Batches)."""
    model.eval()
    batches.load_state_dict({"position": 0})
    total = 0.0
    for _ in range(eval_iters):
        with autocast:
            total = total + objective.eval_loss(model, batches.next()).float()  # summed on the device: one sync at the end
    model.train()
    return (total / eval_iters).item()


def loss_line(loss: float) -> str:
    """`val loss X (perplexity Y)`: perplexity = exp(mean cross-entropy in nats), the tokens' effective branching."""
    return f"val loss {loss:.4f} (perplexity {math.exp(loss):.2f})"
