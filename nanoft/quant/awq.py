"""AWQ: protect the weights that meet large activations by scaling their input channels before rounding (Lin et
al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", arXiv:2306.00978; the
search as in its reference code, github.com/mit-han-lab/llm-awq awq/quantize/auto_scale.py and auto_clip.py).

Scaling: a Linear y = W x is unchanged by W' = W diag(s), x' = x / s. Rounding W' instead of W shrinks the
relative rounding error of the columns with s > 1, and the paper's observation is that the columns worth
protecting are those whose inputs are large. So, per input channel j,

    s_j = mean_tokens(|x_j|)^alpha,  normalised by sqrt(max s * min s)

with alpha on a grid of 20 points in [0, 1), the one that minimises the squared error of the block's output
(the attention's output for q, k, v; the layer's own output otherwise) when the scaled weights are rounded
(`search_scale`). The 1 / s is folded into the operation before (`scale_ln_fcs`: the LayerNorm's gain and bias;
`scale_fc_fc`: the rows of the Linear whose output feeds these columns), so the float model computes the same
function (tests/quant/test_awq.py checks it) and nothing is added at inference.

Clipping (`search_clip`): each group's range is then shrunk to max|w| * (1 - i / 20), i < 10, where the
rounded weights' outputs on (up to 512 of) the calibration tokens are closest to the float ones; the weights
are clamped to it (`apply_clip`). As in the reference, q and k are not clipped (their error passes through the
softmax of q k^T, which one layer's output error does not measure).

The rounding is nanoft's INT4 grid (nanoft.quant.int_linear), shared with RTN and GPTQ so the three compare on
one format; llm-awq's own grid differs only in not forcing 0 into each group's range.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from nanoft.quant.int_linear import fake_quantize, group_params, max_code

N_GRID = 20  # alpha in {0, 1/20, ..., 19/20}; clip ratios 1 - i/20


def pseudo_quantize(w: Tensor, bits: int, group_size: int) -> Tensor:
    """w (out, in) rounded onto the asymmetric group-wise grid and read back (float)."""
    out, n_in = w.shape
    scale, zero = group_params(w, bits, group_size, sym=False)  # (out, in / g)
    wg = w.float().reshape(out, n_in // group_size, group_size)
    return fake_quantize(wg, scale[..., None], zero[..., None], max_code(bits, False)).reshape(out, n_in)


@torch.no_grad()
def search_scale(x: Tensor, linears: list[nn.Linear], run: Callable[[], Tensor], bits: int,
                 group_size: int) -> tuple[Tensor, list[float]]:
    """The per-input-channel scales s (in,) for linears (which all read x (tokens, in)): the alpha of the grid
    whose rounded weights W diag(s) / s make run() (the block's output on the calibration inputs) closest to its
    float output. The linears' weights are restored afterwards. Returns (s, the error at every alpha)."""
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)  # (in,)
    reference = run()
    originals = [fc.weight.detach().clone() for fc in linears]
    best, best_s, errors = float("inf"), None, []
    for i in range(N_GRID):
        s = x_mean.pow(i / N_GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for fc, w in zip(linears, originals, strict=True):
            fc.weight.copy_((pseudo_quantize(w * s, bits, group_size) / s).to(w.dtype))  # x/s against Q(W s)
        error = (reference - run()).float().pow(2).mean().item()
        errors.append(error)
        if error < best:
            best, best_s = error, s
    for fc, w in zip(linears, originals, strict=True):
        fc.weight.copy_(w)
    return best_s, errors


@torch.no_grad()
def scale_ln_fcs(ln: nn.LayerNorm, linears: list[nn.Linear], s: Tensor) -> None:
    """Fold s into a LayerNorm and the Linears reading it: LN's gain and bias / s, the Linears' columns * s."""
    ln.weight.div_(s)
    if ln.bias is not None:
        ln.bias.div_(s)
    for fc in linears:
        fc.weight.mul_(s.view(1, -1))


@torch.no_grad()
def scale_fc_fc(before: nn.Linear, after: nn.Linear, s: Tensor) -> None:
    """Fold s between two Linears, the second reading the first's output through a map that commutes with
    per-channel scaling (attention's weighted mean of the values): before's rows / s, after's columns * s."""
    before.weight.div_(s.view(-1, 1))
    if before.bias is not None:
        before.bias.div_(s)
    after.weight.mul_(s.view(1, -1))


@torch.no_grad()
def search_clip(w: Tensor, x: Tensor, bits: int, group_size: int, max_shrink: float = 0.5,
                n_sample_tokens: int = 512) -> Tensor:
    """Per group, the clipping bound max_val (out, in / g) that makes the rounded group's partial outputs on x
    (tokens, in) closest to the float ones (llm-awq auto_clip_layer)."""
    out, n_in = w.shape
    n_groups = n_in // group_size
    x = x.reshape(-1, n_in).float()
    x = x[:: max(1, x.shape[0] // n_sample_tokens)]  # evenly spaced tokens
    xg = x.reshape(1, -1, n_groups, group_size)  # (1, tokens, G, g)
    wg = w.float().reshape(out, 1, n_groups, group_size)  # (out, 1, G, g)
    best_max = torch.empty(out, 1, n_groups, 1)
    for o in range(0, out, 256):  # output rows in chunks: (rows, tokens, G, g) products fit in memory
        wc = wg[o:o + 256]
        reference = (xg * wc).sum(dim=-1)  # (rows, tokens, G): each group's share of each output
        org_max = wc.abs().amax(dim=-1, keepdim=True)  # (rows, 1, G, 1)
        chunk_best, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * N_GRID)):
            max_val = org_max * (1 - i / N_GRID)
            clipped = torch.clamp(wc, -max_val, max_val).reshape(-1, n_in)
            q = pseudo_quantize(clipped, bits, group_size).reshape(wc.shape)
            err = ((xg * q).sum(dim=-1) - reference).pow(2).mean(dim=1).view(min_err.shape)
            better = err < min_err
            min_err[better], chunk_best[better] = err[better], max_val[better]
        best_max[o:o + 256] = chunk_best
    return best_max.reshape(out, n_groups)


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: Tensor) -> None:
    """Clamp each group of linear's weight to [-max_val, max_val] (max_val: (out, in / g))."""
    w = linear.weight
    wg = w.view(w.shape[0], max_val.shape[1], -1)  # (out, G, g)
    m = max_val.to(w.dtype).unsqueeze(-1)
    wg.copy_(torch.clamp(wg, -m, m))
