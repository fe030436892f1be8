"""GPTQ (nanoft/quant/gptq.py) against the reference code's own function and against a float64 transcription of
Optimal Brain Quantization written the slow way: one column at a time, the inverse Hessian updated explicitly."""
import math

import torch

from nanoft.quant.gptq import gptq, hessian
from nanoft.quant.int_linear import fake_quantize, grid_params, max_code, rtn

# ------------------------------------------------------------------------------------------------------------------
# Test-only reference: IST-DASLab/gptq (github.com/IST-DASLab/gptq, Apache-2.0, Frantar et al.), quant.py's
# `quantize` and `Quantizer.find_params` (perchannel=True, weight=True, mse=False) and gptq.py's
# `GPTQ.fasterquant`, copied with the layer plumbing, timing and printing taken out. nanoft never imports this.


def ref_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


class RefQuantizer:
    def __init__(self, bits, sym=False):
        self.maxq = torch.tensor(2 ** bits - 1)
        self.sym = sym

    def find_params(self, x, weight=True):
        shape = x.shape
        x = x.flatten(1)
        tmp = torch.zeros(x.shape[0], device=x.device)
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            tmp = xmin < 0
            if torch.any(tmp):
                xmin[tmp] = -xmax[tmp]
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = (xmax - xmin) / self.maxq
        if self.sym:
            self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = torch.round(-xmin / self.scale)
        shape = [-1] + [1] * (len(shape) - 1)
        self.scale = self.scale.reshape(shape)
        self.zero = self.zero.reshape(shape)


def ref_fasterquant(W, H, quantizer, blocksize=128, percdamp=.01, groupsize=-1, actorder=False, static_groups=False):
    import copy
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    quantizer.find_params(W, weight=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            q = copy.deepcopy(quantizer)
            q.find_params(W[:, i:(i + groupsize)], weight=True)
            groups.append(q)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)], weight=True)
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    quantizer = groups[idx // groupsize]
            q = ref_quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q

# ------------------------------------------------------------------------------------------------------------------


def layer_and_inputs(out=48, n_in=256, tokens=512, seed=0, dtype=torch.float32):
    """A weight and inputs whose channels are correlated and of unequal size, as a trained layer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / math.sqrt(n_in)
    X = (torch.randn(tokens, n_in, generator=g) @ mix) * torch.rand(n_in, generator=g).mul(3).add(0.1)
    W = torch.randn(out, n_in, generator=g) * 0.05
    return W.to(dtype), X.to(dtype)


def dequantized(codes, scale, zero, group_size):
    expand = lambda t: t.repeat_interleave(group_size, dim=1)
    return expand(scale) * (codes - expand(zero))


def obq_float64(W, H, bits, group_size, percdamp=0.01):
    """OBQ/GPTQ, the slow way (paper, section 3 and eq. 2-3): for each column q in order, fit the group's grid on
    the current weights when a group begins, round, spread the error over the later columns with the current inverse
    Hessian, then remove q from it by Gaussian elimination. No Cholesky, no lazy batches."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    H += percdamp * H.diag().mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    maxq = 2 ** bits - 1
    for q in range(n):
        if q % group_size == 0:
            scale, zero = grid_params(W[:, q:q + group_size], bits, sym=False)
        Q[:, q] = fake_quantize(W[:, q], scale, zero, maxq)
        err = (W[:, q] - Q[:, q]) / Hinv[q, q]
        W[:, q:] -= err[:, None] * Hinv[q, q:][None, :]  # eq. 3: delta_F = -err * [H^-1]_{:,q}
        Hinv -= Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]  # eq. 2: H^-1 without q
    return Q


def test_gptq_matches_the_float64_transcription_of_optimal_brain_quantization():
    """Per-channel, and groups that coincide with the lazy blocks (so that every group is fitted on fully updated
    weights, where the reference's shortcut and the slow way agree): the same codes, in float64."""
    W, X = layer_and_inputs(out=16, n_in=64, tokens=256, dtype=torch.float64)
    H = 2 * X.T @ X / X.shape[0]
    for group_size, blocksize in ((64, 16), (16, 16)):
        codes, scale, zero = gptq(W, H, 4, group_size, blocksize=blocksize)
        ours = dequantized(codes, scale, zero, group_size)
        torch.testing.assert_close(ours, obq_float64(W, H, 4, group_size), rtol=0, atol=1e-12)


def test_gptq_matches_the_reference_code_on_the_same_weights_and_hessian():
    W, X = layer_and_inputs()
    H = hessian([X])
    cases = [dict(group_size=256), dict(group_size=32), dict(group_size=32, act_order=True)]
    for case in cases:
        codes, scale, zero = gptq(W, H, 4, **case)
        ours = dequantized(codes, scale, zero, case["group_size"])
        ref = ref_fasterquant(W, H, RefQuantizer(4), groupsize=-1 if case["group_size"] == 256 else case["group_size"],
                              actorder=case.get("act_order", False), static_groups=case.get("act_order", False))
        # float32 throughout on both sides; one rounding tie may fall the other way, moving one code by one step
        differs = (ours - ref).abs() > 1e-5
        assert differs.float().mean() < 1e-3, (case, differs.sum())
        assert (codes >= 0).all() and (codes <= 15).all() and codes.eq(codes.round()).all()


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    W, X = layer_and_inputs(seed=1)
    H = hessian([X])
    for bits, group, sym in ((4, 32, False), (4, 256, False), (8, 256, True)):
        codes, scale, zero = rtn(W, bits, group, sym)
        rtn_err = (X @ (W - dequantized(codes, scale, zero, group)).T).pow(2).mean()
        for act_order in (False, True):
            codes, scale, zero = gptq(W, H, bits, group, sym=sym, act_order=act_order)
            gptq_err = (X @ (W - dequantized(codes, scale, zero, group)).T).pow(2).mean()
            assert gptq_err < 0.8 * rtn_err, (bits, group, act_order, gptq_err / rtn_err)
            assert codes.min() >= 0 and codes.max() <= max_code(bits, sym)


def test_an_input_that_is_always_zero_gets_weight_zero_and_no_nan():
    W, X = layer_and_inputs(out=8, n_in=64, tokens=128)
    X[:, 5] = 0
    codes, scale, zero = gptq(W, hessian([X]), 4, 32)
    w_hat = dequantized(codes, scale, zero, 32)
    assert torch.isfinite(w_hat).all()
    assert w_hat[:, 5].eq(0).all()  # its code is the zero point: read back exactly 0
