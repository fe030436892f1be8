"""Log-probabilities of chosen tokens from a model's hidden states, a chunk of rows at a time.

DPO needs log pi(y | x) = sum over the response's tokens t of log p(y_t | x, y_<t), and distillation needs a
teacher's and a student's whole softmax at every position. Both start from the final hidden states h (one row
(C,) per position, `GPT.hidden_states`) and the head W (V, C):

    z = W h                          the row's logits, (V,), upcast to float32
    log p(y_t) = z[y_t] - logsumexp(z)

At GPT-2's vocabulary (V = 50304) the logits are the largest tensors of a step: 2,048 rows of them are 412 MB
in float32, and autograd would keep them (and a softmax of the same size) for backward. Every formula here
needs only its own row's logits, so `chunked` computes a function of `chunk_rows` rows at a time under
activation checkpointing: forward keeps only each chunk's small result, and backward recomputes that chunk's
logits when it reaches it (one extra head matmul, rows x V x C, for never holding more than rows x V). The
next-token loss does the same without the recomputation in nanoft/model/chunked_loss.py, by computing its gradient
in the forward pass; that trick needs the loss to be the last thing applied, and DPO's sigmoid comes after.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 22  # logits held per chunk: 16 MiB of float32 (rows = this // vocab)


def chunked(fn: Callable[..., Tensor], *row_tensors: Tensor, vocab: int, chunk_rows: int | None = None) -> Tensor:
    """torch.cat of fn(*chunk) over chunks of the rows (dim 0) of every tensor in row_tensors. fn gets the
    chunk's slices; when gradients are on, each call is checkpointed, so only its output stays alive."""
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    n = row_tensors[0].size(0)
    outs = []
    for i in range(0, n, rows):
        chunk = [t[i:i + rows] for t in row_tensors]
        if torch.is_grad_enabled() and any(t.requires_grad for t in chunk):
            outs.append(checkpoint(fn, *chunk, use_reentrant=False))
        else:
            outs.append(fn(*chunk))
    return torch.cat(outs)


def head_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """(rows, C) @ (V, C)^T -> (rows, V) logits in float32 (float64 stays float64: the tests' exact path); the
    matmul itself in the autocast dtype, if any."""
    z = F.linear(hidden, weight)
    return z if z.dtype == torch.float64 else z.float()


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """hidden (N, C), weight (V, C), targets (N,) -> (N,) log p(target) under softmax(hidden @ W^T), float32."""
    def rows_logprobs(h: Tensor, y: Tensor) -> Tensor:
        z = head_logits(h, weight)
        return z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)

    return chunked(rows_logprobs, hidden, targets, vocab=weight.size(0), chunk_rows=chunk_rows)


def sequence_logprobs(model, x: Tensor, y: Tensor, mask: Tensor, chunk_rows: int | None = None) -> Tensor:
    """(R,) log pi(response | prompt) of each row of an SFT-style batch (x, y, loss_mask, each (R, T)): the sum
    of log p(y_t | x_<=t) over the positions where mask is 1. Only those positions reach the head."""
    hidden = model.hidden_states(x)  # (R, T, C)
    counted = mask.bool()
    logp = token_logprobs(hidden[counted], model.lm_head.weight, y[counted], chunk_rows)  # (N,)
    row_of = counted.nonzero()[:, 0]  # which row each counted position belongs to
    return torch.zeros(x.size(0), device=x.device, dtype=logp.dtype).index_add(0, row_of, logp)
