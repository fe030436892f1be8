"""Cross-entropy of a linear head that never holds the full logits: the loss and both gradients, chunk by chunk.

The plain next-token loss is `F.cross_entropy((h @ W.T).float(), y, ignore_index=-1)` over N = B*T positions:
it materialises an (N, V) float32 logits tensor, and backward adds its gradient of the same size (plus a bf16
copy of each under autocast). At GPT-2's vocabulary V = 50304 that is 412 MB per tensor for 2,048 tokens and
1.65 GB for 8 x 1024, usually the largest tensors of the whole step. The loss needs none of it at once.

For row i with hidden state h_i (C,), head weight W (V, C) and target y_i:

    z_i    = W h_i                          the row's logits (V,), upcast to float32
    loss_i = logsumexp(z_i) - z_i[y_i]
    L      = (1 / n) sum_{i counted} loss_i     n = rows whose target is not ignore_index (-1)

and, with p_i = softmax(z_i) = exp(z_i - logsumexp(z_i)),

    dL/dz_i = (p_i - onehot(y_i)) / n       (0 for an ignored row)
    dL/dh_i = W^T dL/dz_i                   dL/dW = sum_i dL/dz_i h_i^T

Every term needs only its own row's logits. So the rows are processed in chunks: each chunk's logits are
computed, turned into its loss and (while they are at hand) its gradients with respect to h and W, and freed
before the next chunk. The peak holds one chunk's logits (chunk x V) instead of N x V, and the gradients
(the size of h and of W). `forward` computes them; `backward` only scales them by grad_output, the chain rule
for a scalar loss. The FLOPs are those of the plain path (2NVC forward, 4NVC backward): nothing is recomputed.
This is Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024); Cut Cross-Entropy (Wijmans et al. 2024,
"Cut Your Losses in Large-Vocabulary Language Models") goes further and tiles the vocabulary too.

Precision follows the plain path under autocast: the matmuls run in the autocast dtype (bf16), the logits
and softmax in float32, and dL/dz is cast to the matmul dtype as autograd's cast would be. Each chunk's share
of dL/dW comes out of its matmul in bf16 and is summed over the chunks in float32. A tied head's weight is
also the token embedding: autograd adds this gradient to the lookup's.

    loss = linear_cross_entropy(hidden, model.lm_head.weight, targets)   # == the plain loss above
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nanoft.kernels import cross_entropy_cpu

IGNORE_INDEX = -1
# one chunk's logits, at most: 128 MiB. Smaller chunks save little more memory (the gradients, the size of h and
# W, stay) and cost time: each chunk adds a pass over W and dL/dW, and thin matmuls run slowly (measured on a
# 2-core CPU at V = 50304, C = 128: 64-row chunks ran at 0.4x the plain path, 512-row ones at 1.0-1.3x;
# bench/bench_train.py)
CHUNK_BYTES = 128 << 20


def on_cpu_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the chunks go through the CPU's C kernel (kernels/cross_entropy_cpu.py), which keeps the logits in
    the matmul dtype and writes dL/dz over them, or through the PyTorch formula, which upcasts them to float32."""
    return device_type == "cpu" and dtype in cross_entropy_cpu.SUFFIX and cross_entropy_cpu.available()


def chunk_rows_for(n_rows: int, vocab: int, dtype: torch.dtype, device_type: str) -> int:
    """Rows per chunk: equal chunks whose logits fit CHUNK_BYTES, at `dtype`'s size where the C kernel keeps them,
    else at float32's (4 bytes each: the upcast copy, beside which the matmul's own output is briefly alive)."""
    per_logit = dtype.itemsize if on_cpu_kernel(device_type, dtype) else 4
    chunks = math.ceil(n_rows * vocab * per_logit / CHUNK_BYTES)
    return max(1, math.ceil(n_rows / max(chunks, 1)))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets` over the positions whose target is
    not -1, computed without the full logits. hidden (..., C), weight (V, C), targets (...) token ids; the same
    value (and gradients) as `reference_cross_entropy`; NaN when every target is -1, as F.cross_entropy."""
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    device_type = hidden.device.type
    # the matmuls in the autocast dtype, as F.linear's would be; the casts happen per call inside, so that
    # dL/dW is summed in float32 and reaches a float32 weight without a round trip through bf16
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    rows = chunk_rows or chunk_rows_for(hidden.size(0), weight.size(0), dtype, device_type)
    if on_cpu_kernel(device_type, dtype):  # under torch.compile: left to eager, as one piece (_run_eagerly)
        return _run_eagerly(hidden, weight, targets, dtype, rows)
    return _run(hidden, weight, targets, dtype, rows)


def _run(hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, rows)
        return _chunked(hidden, weight, targets, dtype, rows, want_hidden=False, want_weight=False)[0]


# The C kernel is a ctypes call, which torch.compile cannot trace: it would split the loss into ~7 graphs around
# it, each compiled and called separately. Disabled here, a compiled model runs the whole loss eagerly (one
# graph break), and inductor has nothing to fuse in it that the kernel has not already fused.
_run_eagerly = torch.compiler.disable(_run)


def reference_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """The plain path that linear_cross_entropy equals: the full (N, V) logits, upcast, then F.cross_entropy."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
        loss, grad_hidden, grad_weight = _chunked(hidden, weight, targets, dtype, rows, hidden.requires_grad,
                                                  weight.requires_grad)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors  # None where that input needs no gradient
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunked(hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, rows: int, want_hidden: bool,
             want_weight: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(mean loss, dL/dhidden, dL/dweight) with the matmuls in `dtype`, `rows` rows at a time (module docstring).
    The gradients come back in the inputs' own dtypes."""
    w = weight.to(dtype)  # one (V, C) copy per call, as autocast's cast of the weight would be
    counted = targets != IGNORE_INDEX
    n = counted.sum()  # a tensor: no host sync
    inv_n = 1.0 / n.clamp(min=1).float()  # all ignored: every row's gradient is 0 anyway, as F.cross_entropy's
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = None
    c_kernel = on_cpu_kernel(hidden.device.type, dtype)
    grad = want_hidden or want_weight
    # one buffer for every chunk's logits, and one for its share of dL/dW: a fresh one per chunk would cost a
    # CPU its page faults again each time (~30% of the logits' matmul at V = 50304)
    logits = torch.empty(min(rows, hidden.size(0)), weight.size(0), dtype=dtype, device=hidden.device)
    weight_part = torch.empty(weight.shape, dtype=dtype, device=hidden.device) if want_weight else None
    for start in range(0, hidden.size(0), rows):
        h, y, keep = hidden[start:start + rows].to(dtype), targets[start:start + rows], counted[start:start + rows]
        z = torch.mm(h, w.T, out=logits[: h.size(0)])  # (rows, V): this chunk's logits
        y = y.clamp(min=0)  # ignored rows point at token 0; their weight 0 zeroes their terms
        scale = keep * inv_n  # dL/dz's factor per row: 1/n, and 0 for ignored rows
        if c_kernel:  # the C kernel: dL/dz overwrites z, in the matmul dtype
            row_loss, dz = cross_entropy_cpu.rows_cpu(z, y, scale, grad), z
        else:  # the same formula in PyTorch ops (kernels/cross_entropy_cpu.py): float32, then the matmul dtype
            row_loss, dz = cross_entropy_cpu.rows_reference(z, y, scale, grad)
            dz = None if dz is None else dz.to(dtype)  # as autograd's cast of the float32 logits' gradient would
        total += (row_loss * keep).sum()
        if not grad:
            continue
        if want_hidden:
            grad_hidden[start:start + rows] = dz @ w
        if want_weight:  # summed in float32 over the chunks
            part = torch.mm(dz.T, h, out=weight_part)
            if grad_weight is None:
                grad_weight = part.to(torch.float32, copy=True)
            else:
                grad_weight += part
        dz = None  # the float32 copy of the reference path: freed before the next chunk's logits
    if want_weight:
        grad_weight = (torch.zeros_like(weight, dtype=torch.float32) if grad_weight is None else grad_weight
                       ).to(weight.dtype)
    return total / n, grad_hidden, grad_weight
