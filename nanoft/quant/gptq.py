"""GPTQ: choose a layer's integer weights so that its outputs, not its weights, stay close (Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", arXiv:2210.17323; the
algorithm as in its reference code, github.com/IST-DASLab/gptq gptq.py `fasterquant`).

For a Linear with weight W (rows = output channels) and calibration inputs X (in, n), each row w minimises
the output error ||w X - w_hat X||^2, a quadratic with Hessian

    H = 2 X X^T / n                                              (in, in), shared by every row

Optimal Brain Quantization fixes one column q at a time and moves the columns not yet fixed to absorb its error:

    err = (w_q - quant(w_q)) / [H^-1]_qq          W[:, F] -= err * [H^-1]_{q, F}       (F: the columns after q)

after which q is removed from H^-1. Taking the columns in a fixed order, the rows of the upper Cholesky factor
U of H^-1 (H^-1 = U^T U) are those successive H^-1's rows, scaled: so one factorisation replaces every update
of H^-1 (the paper's section 4, step 3). The steps, as the reference does them:

    dead columns (H_qq = 0: an input that is always 0) get H_qq = 1 and weight 0
    act_order: columns by decreasing H_qq (the most active inputs first, while most columns can still move)
    dampening: H += 0.01 * mean(diag H) * I, for a stable inverse
    U = cholesky(cholesky_inverse(cholesky(H)), upper=True)
    lazy batches of 128 columns: the updates inside a block go column by column; the rest of W is updated once
        per block with the block's accumulated errors (W[:, after] -= Err @ U[block, after]): the same numbers,
        far fewer passes over W
    groups: each group of group_size consecutive columns gets its own (scale, zero), fitted when the
        quantization reaches its first column, from the columns as updated so far. Like the reference, the fit
        reads the weights as of the block's start (updates made inside the current block of 128 are not yet
        written back): its numbers, not a cleaner variant's. With act_order the reference fits each group where
        it meets it in the new order (its g_idx then scatters groups); nanoft keeps groups as consecutive
        columns, as its INT4 layout and torch's kernels need, so act_order uses the reference's `static_groups`:
        every group fitted from the original weight before any update.

`gptq` returns the codes on nanoft's grid (nanoft.quant.int_linear): tests/quant/test_gptq.py compares it with a
float64 transcription of these steps and with the reference function itself on the same H and W.
"""
from __future__ import annotations

import torch
from torch import Tensor

from nanoft.quant.int_linear import grid_params, max_code, to_codes


def gptq(W: Tensor, H: Tensor, bits: int, group_size: int, sym: bool = False, act_order: bool = False,
         blocksize: int = 128, percdamp: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """(codes (out, in), scale, zero (out, in / group_size)) for weight W (out, in) given H (in, in).
    group_size = in: one grid per row (per-channel). Computes in float32, as the reference does (float64 inputs:
    in float64, for the tests' transcription)."""
    dtype = torch.promote_types(W.dtype, torch.float32)
    W = W.detach().to(dtype).clone()
    H = H.detach().to(dtype).clone()
    rows, columns = W.shape
    if columns % group_size:
        raise ValueError(f"{columns} input columns are not a multiple of group_size={group_size}")
    maxq = max_code(bits, sym)
    n_groups = columns // group_size

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale = torch.zeros(rows, n_groups, dtype=dtype, device=W.device)
    zero = torch.zeros(rows, n_groups, dtype=dtype, device=W.device)
    if act_order:  # static groups: every group's grid from the original weight (module docstring)
        for g in range(n_groups):
            scale[:, g], zero[:, g] = grid_params(W[:, g * group_size:(g + 1) * group_size], bits, sym)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(columns, device=W.device)

    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(columns, device=W.device)
    H[idx, idx] += damp
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U

    Q = torch.zeros_like(W)  # the codes, in the order the columns are quantized
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // group_size
            if not act_order and col % group_size == 0:  # a new group: its grid, from W as of the block's start
                scale[:, g], zero[:, g] = grid_params(W[:, col:col + group_size], bits, sym)
            w = W1[:, i]
            q = to_codes(w, scale[:, g], zero[:, g], maxq)
            Q[:, col] = q
            err = (w - scale[:, g] * (q - zero[:, g])) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)  # the block's later columns absorb it now
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update: the columns after the block, once
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q, scale, zero


def hessian(inputs: list[Tensor]) -> Tensor:
    """H = 2 X X^T / n from a layer's calibration inputs, each (..., in): X's columns are the n tokens."""
    n_in = inputs[0].shape[-1]
    H = torch.zeros(n_in, n_in, dtype=torch.float64, device=inputs[0].device)
    n = 0
    for x in inputs:
        x = x.reshape(-1, n_in).double()  # (tokens, in)
        H += x.T @ x
        n += x.shape[0]
    return (2 * H / n).float()
