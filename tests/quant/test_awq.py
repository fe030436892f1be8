"""AWQ (nanoft/quant/awq.py): folding the scales leaves the float block's function unchanged, the searched scale is
the paper's formula at the best alpha, it protects the channels that meet large activations, and the clipping search
picks per group what a float64 brute force over the same ratios picks."""
import torch

from nanoft.config import Config
from nanoft.model.gpt import Block
from nanoft.quant.awq import N_GRID, apply_clip, pseudo_quantize, scale_fc_fc, scale_ln_fcs, search_clip, search_scale


def block(seed=0) -> Block:
    torch.manual_seed(seed)
    b = Block(Config(n_embd=64, n_head=4, bias=True, dropout=0.0)).eval()
    with torch.no_grad():  # trained-looking LayerNorms: gains and biases away from 1 and 0
        for ln in (b.ln_1, b.ln_2):
            ln.weight.uniform_(0.5, 2.0)
            ln.bias.normal_(0, 0.1)
    return b


def test_folding_the_scales_leaves_the_float_block_unchanged():
    b = block()
    x = torch.randn(2, 16, 64)
    before = b(x)
    s1, s2, s3 = (torch.rand(64).mul(4).add(0.25) for _ in range(3))
    attn, mlp = b.attn, b.mlp
    scale_ln_fcs(b.ln_1, [attn.q_proj, attn.k_proj, attn.v_proj], s1)
    scale_fc_fc(attn.v_proj, attn.out_proj, s2)  # through attention's weighted mean of the values
    scale_ln_fcs(b.ln_2, [mlp.fc_in], s3)
    after = b(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b.ln_1.weight, torch.ones(64))  # it did change the weights


def test_the_scale_is_mean_abs_activation_to_the_best_alpha_and_protects_the_loud_channels():
    torch.manual_seed(0)
    fc = torch.nn.Linear(128, 64)
    x = torch.randn(512, 128)
    x[:, :4] *= 30  # four loud input channels, as LLM activations have
    reference_w = fc.weight.detach().clone()
    run = lambda: fc(x)
    s, errors = search_scale(x, [fc], run, bits=4, group_size=64)
    torch.testing.assert_close(fc.weight, reference_w, rtol=0, atol=0)  # restored after the search
    best = min(range(N_GRID), key=errors.__getitem__) / N_GRID
    expect = x.abs().double().mean(0).pow(best).clamp(min=1e-4)
    expect = expect / (expect.max() * expect.min()).sqrt()
    torch.testing.assert_close(s.double(), expect, rtol=1e-5, atol=1e-6)
    assert best > 0 and min(errors) < 0.7 * errors[0]  # errors[0] (alpha = 0, s = 1) is plain round-to-nearest


def test_the_clip_search_picks_what_a_float64_brute_force_picks():
    torch.manual_seed(1)
    w = torch.randn(8, 64) * 0.05
    w[:, 3] = 0.6  # an outlier column stretches its group's range
    x = torch.randn(256, 64)
    got = search_clip(w, x, bits=4, group_size=32)
    W, X = w.double(), x.double()
    for row in range(8):
        for grp in range(2):
            cols = slice(32 * grp, 32 * (grp + 1))
            top = W[row, cols].abs().max()
            errs = []
            for i in range(10):  # max_shrink 0.5 of a 20-point grid
                m = top * (1 - i / N_GRID)
                q = pseudo_quantize(W[row:row + 1, cols].clamp(-m, m), 4, 32)[0]
                errs.append(((X[:, cols] @ q - X[:, cols] @ W[row, cols]) ** 2).mean().item())
            i = min(range(10), key=errs.__getitem__)
            torch.testing.assert_close(got[row, grp].double(), top * (1 - i / N_GRID), rtol=1e-5, atol=1e-7)
    lin = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    apply_clip(lin, got)
    assert (lin.weight.abs().view(8, 2, 32).amax(-1) <= got + 1e-7).all()
