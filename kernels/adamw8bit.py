"""The 8-bit AdamW update, fused: dequantize both states, take one AdamW step, requantize, in one pass.

Block-wise 8-bit optimizers (Dettmers, Lewis, Shleifer, Zettlemoyer 2022, "8-bit Optimizers via Block-wise
Quantization", arXiv:2110.02861) store Adam's two states as one byte per value plus one float32 absmax per
block of 256 values (see blockwise8.py for the format): the first moment m with the signed dynamic map, the
second moment v (never negative) with the unsigned one, which spends all 256 codes on [0, 1]. For each
element, with g the gradient and t the step:

    m, v    = code1[m_codes] * m_absmax[block],  code2[v_codes] * v_absmax[block]      dequantize (float32)
    m       = beta1 m + (1 - beta1) g
    v       = beta2 v + (1 - beta2) g^2
    denom   = sqrt(v) / sqrt(1 - beta2^t) + eps
    p       = p (1 - lr weight_decay)                        decoupled weight decay, before the step
    p       = p - (lr / (1 - beta1^t)) m / denom
    m_codes, m_absmax = quantize(m);  v_codes, v_absmax = quantize(v)                  requantize (new absmax)

This is bitsandbytes 0.50's CPU update (backends/cpu/ops.py) operation for operation. Its CUDA kernel differs
in three ways that we do not copy: it decays the weights after the step (p = (p + step) (1 - lr wd)), skips
elements whose gradient is NaN/inf, and nudges a requantized first moment whose code has the wrong sign onto
the next code. Following the CPU package lets the tests compare against a bitsandbytes we can run, and the
decay order is then torch.optim.AdamW's.

Three implementations of the same function (the third, for float32 on the CPU, is adamw8bit_cpu.py's C loop,
bit-identical to the reference there, 10-20x faster):
- `adamw8bit_update_reference_`: dequantize_blockwise8 -> the torch ops above -> quantize_blockwise8. The spec.
- `_adamw8bit_kernel` (Triton): one program per 256-value block does all of it in registers, so the states
  cross memory once as bytes instead of three times as float32 (the reference materialises m and v).
  It reproduces the reference's roundings: torch's CPU `add_(x, alpha=)` and `addcmul_` are fused
  multiply-adds (checked bit-for-bit in tests), so the kernel uses `tl.fma` at those two places and is
  launched with fp fusion off everywhere else; division and sqrt are the IEEE-rounded ones. Under the CPU
  interpreter the states come out bit-identical to the reference; the parameter can differ in its last bit,
  because torch's vectorised CPU sqrt is off by up to one ulp where Triton's sqrt_rn is correctly rounded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import adamw8bit_cpu
from ._triton import tl, triton, use_triton
from .blockwise8 import (
    LUT_SIZE,
    dequantize_blockwise8,
    dynamic_map_on,
    quantize_block,
    quantize_blockwise8,
    quantize_lut,
    store_rounded,
)

BLOCKSIZE = 256  # values per quantization block, as bitsandbytes' blockwise optimizers


@triton.jit
def _adamw8bit_kernel(
    p_ptr,  # *fp32/fp16/bf16, [n] parameter, updated in place
    g_ptr,  # *fp32/fp16/bf16, [n] gradient
    m_codes_ptr,  # *uint8, [n] first-moment codes (signed map), rewritten
    m_absmax_ptr,  # *fp32, [n_blocks] first-moment block scales, rewritten
    v_codes_ptr,  # *uint8, [n] second-moment codes (unsigned map), rewritten
    v_absmax_ptr,  # *fp32, [n_blocks] second-moment block scales, rewritten
    code1_ptr,  # *fp32, [256] signed dynamic map
    code2_ptr,  # *fp32, [256] unsigned dynamic map
    lut1_ptr,  # *uint8, [LUT_SIZE] quantization lookup table of code1 (see blockwise8)
    lut2_ptr,  # *uint8, [LUT_SIZE] quantization lookup table of code2
    n,  # number of elements
    beta1,  # fp32 first-moment decay
    one_minus_beta1,  # fp32 1 - beta1, rounded as torch rounds its `alpha`
    beta2,  # fp32 second-moment decay
    one_minus_beta2,  # fp32 1 - beta2
    correction2,  # fp32 sqrt(1 - beta2^t)
    eps,  # fp32 denominator epsilon
    decay,  # fp32 1 - lr * weight_decay (1.0 when there is no decay)
    step_size,  # fp32 -lr / (1 - beta1^t)
    BLOCKSIZE: tl.constexpr,  # elements per quantization block; one program per block
    LUT_STEPS: tl.constexpr,  # LUT_SIZE - 1
    P_BF16: tl.constexpr,  # parameter is bfloat16: round the store by hand (see blockwise8.store_rounded)
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)  # int64: n may exceed 2**31
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_q = tl.load(m_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_q = tl.load(v_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(code1_ptr + m_q) * tl.load(m_absmax_ptr + pid)  # dequantize
    v = tl.load(code2_ptr + v_q) * tl.load(v_absmax_ptr + pid)

    m = tl.fma(g, one_minus_beta1, m * beta1)  # m.mul_(beta1).add_(g, alpha=1 - beta1)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = tl.math.div_rn(tl.sqrt_rn(v), correction2) + eps
    p = p * decay
    p = p + tl.math.div_rn(step_size * m, denom)  # p.addcdiv_(m, denom, value=step_size)
    store_rounded(p_ptr + offs, p, mask, P_BF16)

    m_q, m_absmax = quantize_block(m, mask, lut1_ptr, LUT_STEPS)
    v_q, v_absmax = quantize_block(v, mask, lut2_ptr, LUT_STEPS)
    tl.store(m_codes_ptr + offs, m_q, mask=mask)
    tl.store(v_codes_ptr + offs, v_q, mask=mask)
    tl.store(m_absmax_ptr + pid, m_absmax)
    tl.store(v_absmax_ptr + pid, v_absmax)


def dynamic_maps(device: torch.device) -> tuple[Tensor, Tensor]:
    """(signed, unsigned) dynamic maps on `device`: the first and second moments' code tables."""
    return dynamic_map_on(device, signed=True), dynamic_map_on(device, signed=False)


def _scalars(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> dict:
    """The per-step constants, in Python double precision as bitsandbytes computes them."""
    return dict(
        correction1=1.0 - beta1**step,
        correction2=math.sqrt(1.0 - beta2**step),
        decay=1.0 - lr * weight_decay,
    )


def _check(p: Tensor, g: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor) -> None:
    n = p.numel()
    n_blocks = -(-n // BLOCKSIZE)
    if g.shape != p.shape or m_codes.shape != p.shape or v_codes.shape != p.shape:
        raise ValueError(f"p, grad and codes must share a shape: {p.shape}, {g.shape}, {m_codes.shape}, {v_codes.shape}")
    if m_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {m_codes.dtype} and {v_codes.dtype}")
    for name, a in (("m_absmax", m_absmax), ("v_absmax", v_absmax)):
        if a.dtype != torch.float32 or a.numel() != n_blocks:
            raise ValueError(f"{name} must be float32 with {n_blocks} elements, got {a.dtype} x {a.numel()}")
    for t in (p, g, m_codes, v_codes, m_absmax, v_absmax):
        if not t.is_contiguous():
            raise ValueError("the fused AdamW8bit update needs contiguous tensors")
        if t.device != p.device:
            raise ValueError(f"all tensors must be on {p.device}, found one on {t.device}")


def adamw8bit_update_(
    p: Tensor, g: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor, *,
    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, backend: str = "auto",
) -> None:
    """One AdamW step on p with 8-bit block-wise states, all updated in place (see the module docstring).

    backend: "triton" (the fused kernel), "torch" (the reference), or "auto": the Triton kernel on CUDA (see
    _triton.use_triton), the C loop of adamw8bit_cpu.py for float32 on the CPU, else the reference.
    """
    use_kernel = use_triton(backend, p.device)  # checks `backend` first
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    _check(p, g, m_codes, m_absmax, v_codes, v_absmax)
    if not use_kernel and backend == "auto" and adamw8bit_cpu.supports(p, g):  # float32 on the CPU: the C loop
        code1, code2 = dynamic_maps(p.device)
        s = _scalars(step, lr, beta1, beta2, eps, weight_decay)
        adamw8bit_cpu.adamw8bit_update_cpu_(
            p, g, m_codes, m_absmax, v_codes, v_absmax, code1, code2, quantize_lut(code1), quantize_lut(code2),
            beta1=beta1, beta2=beta2, correction2=s["correction2"], eps=eps,
            decay=s["decay"] if weight_decay > 0.0 else None, step_size=-lr / s["correction1"])
        return
    if not use_kernel:
        adamw8bit_update_reference_(p, g, m_codes, m_absmax, v_codes, v_absmax, step=step, lr=lr, beta1=beta1,
                                    beta2=beta2, eps=eps, weight_decay=weight_decay)
        return
    n = p.numel()
    if n == 0:
        return
    code1, code2 = dynamic_maps(p.device)
    s = _scalars(step, lr, beta1, beta2, eps, weight_decay)
    _adamw8bit_kernel[(triton.cdiv(n, BLOCKSIZE),)](
        p, g, m_codes, m_absmax, v_codes, v_absmax, code1, code2, quantize_lut(code1), quantize_lut(code2), n,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, s["correction2"], eps,
        s["decay"] if weight_decay > 0.0 else 1.0, -lr / s["correction1"],
        BLOCKSIZE=BLOCKSIZE, LUT_STEPS=float(LUT_SIZE - 1), P_BF16=p.dtype == torch.bfloat16,
        enable_fp_fusion=False,  # only the two explicit tl.fma fuse, as torch's CPU ops do
    )


@torch.no_grad()
def adamw8bit_update_reference_(
    p: Tensor, g: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor, *,
    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """The readable specification: bitsandbytes' CPU 8-bit blockwise Adam update, in torch ops."""
    code1, code2 = dynamic_maps(p.device)
    m = dequantize_blockwise8(m_codes, m_absmax, code1, BLOCKSIZE, backend="torch")  # float32, p's shape
    v = dequantize_blockwise8(v_codes, v_absmax, code2, BLOCKSIZE, backend="torch")
    p32 = p.float()  # p itself when p is float32
    adamw_float32_(p32, g.float(), m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                   weight_decay=weight_decay)
    if p32 is not p:
        p.copy_(p32)

    codes, absmax = quantize_blockwise8(m, code1, BLOCKSIZE, backend="torch")
    m_codes.copy_(codes)
    m_absmax.copy_(absmax)
    codes, absmax = quantize_blockwise8(v, code2, BLOCKSIZE, backend="torch")
    v_codes.copy_(codes)
    v_absmax.copy_(absmax)


def adamw_float32_(p32: Tensor, grad: Tensor, m: Tensor, v: Tensor, *, step: int, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float) -> None:
    """The element-wise part of the reference, on float32 tensors in place: the order of operations (and so
    the roundings) that the Triton kernel, the C loop and the FSDP shard update (nanoft.optim.sharded) keep."""
    s = _scalars(step, lr, beta1, beta2, eps, weight_decay)
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (v.sqrt() / s["correction2"]).add_(eps)
    if weight_decay > 0.0:
        p32.mul_(s["decay"])
    p32.addcdiv_(m, denom, value=-lr / s["correction1"])
