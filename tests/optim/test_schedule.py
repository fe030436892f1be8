"""warmup_cosine: nanoGPT's warmup convention, cosine decay to min_lr, flat after max_iters."""
import itertools
import math

from nanoft.optim.schedule import warmup_cosine

KW = dict(warmup_iters=100, max_iters=1000, lr=6e-4, min_lr=6e-5)


def test_warmup_starts_above_zero_and_reaches_the_peak():
    assert warmup_cosine(0, **KW) == 6e-4 * 1 / 101  # step 0 already moves the weights
    lrs = [warmup_cosine(s, **KW) for s in range(100)]
    assert all(a < b for a, b in itertools.pairwise(lrs))
    assert warmup_cosine(100, **KW) == 6e-4


def test_cosine_decay_halfway_and_end():
    assert math.isclose(warmup_cosine(550, **KW), 6e-5 + 0.5 * (6e-4 - 6e-5))
    assert warmup_cosine(1000, **KW) == 6e-5 and warmup_cosine(5000, **KW) == 6e-5
    lrs = [warmup_cosine(s, **KW) for s in range(100, 1001)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_no_warmup():
    assert warmup_cosine(0, warmup_iters=0, max_iters=10, lr=1.0, min_lr=0.0) == 1.0
