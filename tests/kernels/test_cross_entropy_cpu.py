"""kernels/cross_entropy_cpu.py: the C kernel of the chunked loss against its PyTorch reference and against torch's
own F.cross_entropy and softmax, in float32 and bfloat16 logits, split over threads, with ignored rows, extreme
logits and NaN. tests/model/test_chunked_loss.py runs it inside the whole linear + cross-entropy."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import torch_threads

from nanoft.kernels import cross_entropy_cpu as xent
from nanoft.model import chunked_loss

V = 1000


def logits(rows: int, dtype: torch.dtype, seed: int = 0, spread: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, V, generator=g) * spread).to(dtype)


def case(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, V, (rows,), generator=g)
    targets[:2] = torch.tensor([0, V - 1])  # the row's first and last entries
    scale = torch.full((rows,), 1.0 / rows)
    scale[::5] = 0.0  # ignored rows: weight 0
    return targets, scale


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_the_c_kernel_builds_where_there_is_a_compiler():
    assert xent.available()  # else chunked_loss runs the reference, and the tests below compare it with itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_equal_the_reference_and_torch(dtype):
    z = logits(67, dtype)
    targets, scale = case(67)
    ref_loss, ref_dz = xent.rows_reference(z.clone(), targets, scale, grad=True)
    got = z.clone()
    loss = xent.rows_cpu(got, targets, scale, grad=True)
    # torch's own: per-row cross-entropy and its gradient softmax - onehot, from float32 logits
    z32 = z.float().requires_grad_()
    torch_loss = F.cross_entropy(z32, targets, reduction="none")
    (torch_loss * scale).sum().backward()
    for want in (ref_loss, torch_loss.detach()):
        torch.testing.assert_close(loss, want, rtol=2e-6, atol=2e-6)  # a few float32 ulps of log-sum-exp ~ 8
    if dtype == torch.float32:  # the gradient in float32: within float32 rounding of exp and the sum
        for want in (ref_dz, z32.grad):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    else:  # written in bfloat16, as the reference's float32 result cast: equal but for rare last-bit ties
        cast = ref_dz.to(torch.bfloat16)
        ulps = (got.view(torch.int16).int() - cast.view(torch.int16).int()).abs()
        assert ulps.max() <= 1 and (ulps > 0).float().mean() < 1e-3
        torch.testing.assert_close(got.float(), z32.grad, rtol=2 ** -8, atol=1e-9)  # bf16's own rounding
    assert torch.equal(got[scale == 0].float(), torch.zeros_like(got[scale == 0].float()))  # ignored: no gradient


def test_without_grad_the_logits_are_untouched():
    z = logits(9, torch.bfloat16)
    targets, scale = case(9)
    kept = z.clone()
    loss = xent.rows_cpu(z, targets, scale, grad=False)
    assert torch.equal(z, kept)
    torch.testing.assert_close(loss, xent.rows_reference(z, targets, scale, grad=False)[0], rtol=2e-6, atol=2e-6)


def test_rows_split_across_threads_equal_one_thread():
    z = logits(xent.PARALLEL_FROM // V + 3, torch.bfloat16, seed=3)  # enough logits for every thread
    targets, scale = case(z.size(0), seed=3)
    one, two = z.clone(), z.clone()
    with torch_threads(1):
        loss_one = xent.rows_cpu(one, targets, scale, grad=True)
    with torch_threads(2):
        loss_two = xent.rows_cpu(two, targets, scale, grad=True)
    assert torch.equal(loss_one, loss_two) and torch.equal(one, two)  # each row is computed alone: same bits


def test_extreme_logits_and_nan():
    z = torch.zeros(4, V)
    z[0] = 80.0  # a uniform row at a large offset: exp(z - max) = 1 everywhere, loss = log V
    z[1, 3] = 1e4  # one logit dominating: p = onehot(3), its loss 0 if it is the target
    z[2, 7] = -1e4  # one logit far below the rest
    z[3, 5] = float("nan")
    targets = torch.tensor([1, 3, 7, 0])
    scale = torch.ones(4)
    loss = xent.rows_cpu(z.clone(), targets, scale, grad=False)
    want = F.cross_entropy(z[:3], targets[:3], reduction="none")
    torch.testing.assert_close(loss[:3], want, rtol=2e-6, atol=2e-6)
    assert abs(loss[0].item() - torch.log(torch.tensor(float(V))).item()) < 1e-5
    assert torch.isnan(loss[3])  # a NaN logit reaches the loss, as torch's amax would: train.py's guard sees it


def test_bad_targets_are_one_clear_error():
    z = logits(3, torch.float32)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 1000\)"):
        xent.rows_cpu(z, torch.tensor([0, V, 1]), torch.ones(3), grad=True)
    with pytest.raises(ValueError, match="must be"):
        xent.rows_cpu(z, torch.tensor([0, 1]), torch.ones(3), grad=True)


def test_the_chunked_loss_runs_the_kernel_on_the_cpu(monkeypatch):
    """Not the reference: the C path is what train.py's loss uses here (the reference raises if called)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran where the C kernel should")

    monkeypatch.setattr(xent, "rows_reference", refuse)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(V, 16, requires_grad=True)
    targets = torch.randint(0, V, (40,))
    with torch.autocast("cpu", torch.bfloat16):
        loss = chunked_loss.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    monkeypatch.undo()
    with torch.autocast("cpu", torch.bfloat16):
        want = chunked_loss.reference_cross_entropy(hidden.detach(), weight.detach(), targets)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)  # the same bf16 logits on both sides
    assert hidden.grad is not None and weight.grad is not None
