"""The chunked linear + cross-entropy (nanoft/model/chunked_loss.py) against the plain F.cross_entropy of the full
logits: the loss and both gradients, in float32 and under bf16 autocast, with ignored positions, an all-ignored
batch, a frozen head, and inside GPT, whose tied head gets its gradient through both of its uses."""

import pytest
import torch
import torch.nn.functional as F

from nanoft.config import Config
from nanoft.model.chunked_loss import linear_cross_entropy, reference_cross_entropy
from nanoft.model.gpt import GPT

N, C, V = 150, 32, 500


def inputs(seed: int = 0, ignored_every: int = 4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    if ignored_every:
        targets[::ignored_every] = -1
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden, weight, targets, upstream: float = 1.0, bf16: bool = False):
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = loss_fn(hidden, weight, targets)
    (loss * upstream).backward()  # upstream: train.py divides by grad_accum before backward
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [7, 64, 150, 1000])  # uneven, even, exactly N, more than N
def test_float32_loss_and_gradients_equal_the_full_logits_path(chunk_rows):
    hidden, weight, targets = inputs()
    want = loss_and_grads(reference_cross_entropy, hidden, weight, targets, upstream=0.37)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=chunk_rows), hidden, weight,
                         targets, upstream=0.37)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert got[1][::4].abs().max() == 0  # ignored positions get no gradient


def test_bf16_autocast_matches_the_full_logits_path_within_its_own_rounding():
    """Under autocast both paths multiply in bf16 and take the softmax in float32; they round at different
    places (the chunked head gradient once per chunk), so each is compared with float64 maths on the same
    bf16-rounded inputs: the chunked path's error is at most twice the plain path's own."""
    hidden, weight, targets = inputs()
    want = loss_and_grads(reference_cross_entropy, hidden, weight, targets, bf16=True)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=64), hidden, weight, targets,
                         bf16=True)
    assert all(t.dtype == torch.float32 for t in got)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=1e-4)
    h64, w64 = (t.detach().bfloat16().double().requires_grad_() for t in (hidden, weight))
    truth = loss_and_grads(reference_cross_entropy, h64, w64, targets)
    for g, w, t in zip(got, want, truth):
        assert (g.double() - t).abs().max() <= 2 * (w.double() - t).abs().max() + 1e-7


def test_every_position_ignored_gives_nan_and_zero_gradients_as_f_cross_entropy():
    hidden, weight, targets = inputs()
    targets[:] = -1
    want = loss_and_grads(reference_cross_entropy, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=64), hidden, weight, targets)
    assert want[0].isnan() and got[0].isnan()
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]) and got[2].abs().max() == 0


def test_a_single_counted_position_and_a_frozen_head():
    """One target out of N: the mean is over 1, not N. A frozen head (LoRA) gets no gradient; hidden does."""
    hidden, weight, targets = inputs(ignored_every=0)
    targets[1:] = -1
    weight.requires_grad_(False)
    want = loss_and_grads(reference_cross_entropy, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=16), hidden, weight, targets)
    assert got[2] is None and want[2] is None
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)


def test_without_gradients_it_is_the_same_loss_and_builds_no_graph():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, chunk_rows=64)
        want = reference_cross_entropy(hidden, weight, targets)
    assert got.grad_fn is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_nothing_the_size_of_the_logits_is_kept_for_backward():
    """The point of the module: the plain path keeps (N, V) tensors alive until backward; the chunked one only
    the gradients, the sizes of hidden and of the head."""
    hidden, weight, targets = inputs()

    def largest_saved(loss_fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss_fn(hidden, weight, targets)
        return max(sizes)

    assert largest_saved(reference_cross_entropy) >= N * V
    assert largest_saved(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=16)) <= V * C


@pytest.mark.parametrize("tied", [True, False])
def test_gpt_loss_and_every_gradient_equal_the_full_logits_path(tied):
    """model(x, y, mask) (chunked, no logits) against cross-entropy of model(x)'s full logits (plain). Tied, the
    embedding's gradient is the sum of the lookup's and the head's: both must arrive."""
    cfg = Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300, dropout=0.0, tie_embeddings=tied)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, :5] = 0
    grads = []
    for plain in (True, False):
        model.zero_grad(set_to_none=True)
        if plain:
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x.masked_fill(mask == 0, -1).flatten(), ignore_index=-1)
        else:
            loss = model(x, x, mask)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want_loss, want), (got_loss, got) = grads
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert (model.lm_head.weight is model.wte.weight) == tied
