"""Adafactor against a direct transcription of the paper's Algorithms 4-5 and against torch.optim.Adafactor."""
import math

import pytest
import torch

from nanoft.optim import Adafactor


def paper_adafactor(x0: torch.Tensor, grads: list[torch.Tensor], eps1=1e-30, eps2=1e-3, d=1.0) -> torch.Tensor:
    """Shazeer and Stern 2018, Algorithm 4 (factored, n x m) and 5 (vector), with the relative step size of
    Section 8 (rho_t = min(1e-2, 1/sqrt(t)), alpha_t = max(eps2, RMS(X_{t-1})) rho_t) and beta2_t = 1 - t^-0.8,
    in float64, with row and column *sums* as the paper writes them."""
    x = x0.double().clone()
    R = torch.zeros(x.shape[0], dtype=torch.float64)
    C = torch.zeros(x.shape[-1], dtype=torch.float64)
    V = torch.zeros_like(x)
    rms = lambda t: t.pow(2).mean().sqrt()
    for t, g in enumerate(grads, start=1):
        g = g.double()
        rho = min(1e-2, 1 / math.sqrt(t))
        alpha = max(eps2, rms(x).item()) * rho
        beta2 = 1 - t ** -0.8
        if x.dim() == 2:
            R = beta2 * R + (1 - beta2) * (g**2 + eps1).sum(dim=1)  # (G^2 + eps1 1 1^T) 1_m
            C = beta2 * C + (1 - beta2) * (g**2 + eps1).sum(dim=0)  # 1_n^T (G^2 + eps1 1 1^T)
            V_hat = torch.outer(R, C) / R.sum()  # R_t C_t / (1_n^T R_t)
        else:
            V = beta2 * V + (1 - beta2) * (g**2 + eps1)
            V_hat = V
        U = g / V_hat.sqrt()
        U_hat = U / max(1.0, rms(U).item() / d)
        x = x - alpha * U_hat
    return x


@pytest.mark.parametrize("shape", [(24, 40), (40,)])
def test_matches_the_paper(shape):
    torch.manual_seed(0)
    x0 = torch.randn(shape) * 0.5
    grads = [torch.randn(shape) * 0.1 * (1 + t % 3) for t in range(30)]
    p = torch.nn.Parameter(x0.clone())
    opt = Adafactor([p])  # the defaults: relative_step, scale_parameter, no beta1, no weight decay
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach().double(), paper_adafactor(x0, grads), rtol=1e-5, atol=1e-6)


def test_matches_torch_adafactor():
    """torch.optim.Adafactor is the paper's relative-step, parameter-scaled Adafactor without momentum:
    lr=1e-2 there is the cap of rho_t. It clamps V at eps1^2 instead of adding eps1 to G^2 (no difference
    for gradients of this size). It factors tensors of 3 dimensions over the last two, as we do."""
    torch.manual_seed(0)
    shapes = [(16, 24), (3, 8, 12), (24,)]
    ours = [torch.nn.Parameter(torch.randn(s) * 0.3) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = Adafactor(ours)
    ref = torch.optim.Adafactor(theirs, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0)
    for step in range(25):
        grads = [torch.randn(s) * 0.05 * (1 + step % 4) for s in shapes]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_is_n_plus_m_for_a_matrix():
    p, b = torch.nn.Parameter(torch.randn(30, 50)), torch.nn.Parameter(torch.randn(50))
    opt = Adafactor([p, b])
    p.grad, b.grad = torch.randn_like(p), torch.randn_like(b)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg_sq_row"].shape == (30,) and state["exp_avg_sq_col"].shape == (50,)
    assert sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor)) == 30 + 50
    assert opt.state[b]["exp_avg_sq"].shape == (50,)


def test_relative_step_ignores_the_schedules_lr_and_external_lr_is_used_otherwise():
    torch.manual_seed(0)
    p0, g = torch.randn(8, 12), torch.randn(8, 12)
    results = []
    for lr_set_by_loop in (None, 5.0):
        p = torch.nn.Parameter(p0.clone())
        opt = Adafactor([p])
        if lr_set_by_loop is not None:
            opt.param_groups[0]["lr"] = lr_set_by_loop  # what train.py does each step
        p.grad = g.clone()
        opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])

    # relative_step=False, scale_parameter=False: the step is exactly lr * the clipped update
    p = torch.nn.Parameter(p0.clone())
    opt = Adafactor([p], lr=1e-3, relative_step=False, scale_parameter=False)
    p.grad = g.clone()
    opt.step()
    row, col = (g**2).mean(1), (g**2).mean(0)  # first step: beta2_1 = 0, the statistics are this G's
    u = g / (torch.outer(row, col) / row.mean()).sqrt()
    u = u / max(1.0, u.pow(2).mean().sqrt().item())
    torch.testing.assert_close(p.detach(), p0 - 1e-3 * u)


def test_warmup_init_beta1_and_weight_decay():
    torch.manual_seed(0)
    p0, g = torch.randn(40), torch.randn(40)
    # warmup_init: rho_1 = min(1e-6 * 1, 1), times RMS(p0) (scale_parameter); a vector keeps the full V
    p = torch.nn.Parameter(p0.clone())
    opt = Adafactor([p], warmup_init=True, beta1=0.9, weight_decay=0.1)
    p.grad = g.clone()
    opt.step()
    alpha = 1e-6 * p0.pow(2).mean().sqrt().item()
    u = g / (g**2 + 1e-30).sqrt()  # V_1 = G^2 + eps1
    u = u / max(1.0, u.pow(2).mean().sqrt().item())
    m = (1 - 0.9) * alpha * u  # the first moment averages the scaled updates (transformers' order)
    expected = p0 * (1 - 0.1 * alpha) - m
    torch.testing.assert_close(p.detach(), expected)
    assert opt.state[p]["exp_avg"].shape == (40,)


def test_bad_arguments_raise():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="lr=None"):
        Adafactor(params, lr=1e-3)
    with pytest.raises(ValueError, match="needs an lr"):
        Adafactor(params, relative_step=False)
    with pytest.raises(ValueError, match="warmup_init"):
        Adafactor(params, lr=1e-3, relative_step=False, warmup_init=True)
