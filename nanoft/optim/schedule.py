"""The learning-rate schedule: linear warmup, then cosine decay to min_lr.

A pure function of the step, so resuming a run needs no scheduler state. Warmup follows nanoGPT's
convention, lr * (step + 1) / (warmup_iters + 1), so that step 0 already moves the weights (a schedule
that starts at exactly 0 wastes the first step). After max_iters the rate stays at min_lr.
"""
import math


def warmup_cosine(step: int, *, warmup_iters: int, max_iters: int, lr: float, min_lr: float) -> float:
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= max_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, max_iters - warmup_iters)  # 0 -> 1 over the decay
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)
