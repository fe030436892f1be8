"""llama.cpp's simplest block formats, Q8_0 and Q4_0: what a GGUF file (nanoft.interop.gguf) holds for a weight.

A row of a weight (one output's n inputs, n a multiple of 32) is cut into blocks of 32 values; each block is stored
as one fp16 scale d and 32 small integers q, and reads back as x ~ d * q. Both are symmetric (no zero point) and
round to nearest, as ggml's reference `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` (ggml-quants.c) do:

    Q8_0  (34 bytes = 8.5 bits a weight)    d = max|x| / 127        q = round(x / d)  in -127..127
          [d: fp16][q_0 .. q_31: int8]       round half away from zero; x / d is computed as x * (1 / d), float32

    Q4_0  (18 bytes = 4.5 bits a weight)    m = the element of largest |x| (the first, on ties), sign kept
          [d: fp16][16 bytes of nibbles]     d = m / -8              q = min(15, trunc(x * (1 / d) + 8.5))  in 0..15
                                             x ~ d * (q - 8)
          byte j holds q_j (low nibble) and q_{j+16} (high nibble): the block's first half in the low nibbles.

Q4_0's scale is signed so that the largest element lands exactly on the code that has no mirror: q = 0 gives
d * -8 = m, while the other end of the range, q = 15, is 7 d. Every step is float32 as in ggml's C: 1 / d, the
product x * (1 / d) rounded, then + 8.5 rounded, then truncated (C's cast to an integer). That is what llama.cpp's
own numpy writer (`gguf.quants` in the gguf package, which this file is tested bit-exact against) computes; a C
compiler allowed to fuse the multiply-add into one rounding can put a rare value one code apart. q is found with
the float32 d, then d is rounded to fp16 for storage: the value read back, fp16(d) * q, is what the file means,
and what llama.cpp, transformers and `dequantize` below compute.

Error of one value (x in a block with abs-max a, before the fp16 rounding of d, which changes each value by at most
2^-11 relative): Q8_0 |x - d q| <= d / 2 = a / 254; Q4_0 |x - d (q - 8)| <= |d| / 2 = a / 16, except at the top
code, which clips: x near +a (the opposite sign of m) reads back as 7 |d| = 7a / 8, an error up to a / 8.
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32  # values per block, in both formats


def _blocks(x: Tensor) -> Tensor:
    """(..., n) -> (N, 32) float32 blocks along the last dimension, which must hold whole blocks."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"a row of {x.shape[-1]} values is not whole blocks of {BLOCK}")
    return x.detach().float().reshape(-1, BLOCK)


def _fp16_bytes(d: Tensor) -> Tensor:
    """(N, 1) float32 scales -> (N, 2) bytes of their fp16 values (round to nearest even), little-endian as in files."""
    return d.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _round_half_away(v: Tensor) -> Tensor:
    """C's roundf in float32 ops: floor(|v|) + floor(2 * frac(|v|)), signed. (torch.round goes half to even.)"""
    a = v.abs()
    whole = a.floor()
    return v.sign() * (whole + (2 * (a - whole)).floor())


def quantize_q8_0(x: Tensor) -> Tensor:
    """x (..., n) -> (..., n / 32 * 34) uint8: each block as fp16 d, then 32 int8 codes."""
    blocks = _blocks(x)  # (N, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # (N, 1), float32
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)  # an all-zero block: d = 0, every q = 0
    q = _round_half_away(blocks * inv).to(torch.int8)  # |x * inv| <= 127 (+ rounding): no clamp needed
    out = torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=1)  # (N, 34)
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * 34)


def dequantize_q8_0(data: Tensor) -> Tensor:
    """(..., m * 34) uint8 -> (..., m * 32) float32: fp16(d) * q."""
    blocks = data.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (N, 1)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (N, 32)
    return (q * d).reshape(*data.shape[:-1], data.shape[-1] // 34 * BLOCK)


def quantize_q4_0(x: Tensor) -> Tensor:
    """x (..., n) -> (..., n / 32 * 18) uint8: each block as fp16 d, then 16 bytes of 4-bit codes."""
    blocks = _blocks(x)  # (N, 32)
    m = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # (N, 1): the first largest |x|, signed
    d = m / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (blocks * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8)  # (N, 32), float32 maths: two roundings
    packed = q[:, :16] | (q[:, 16:] << 4)  # (N, 16): first half low nibbles, second half high
    out = torch.cat([_fp16_bytes(d), packed], dim=1)  # (N, 18)
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * 18)


def dequantize_q4_0(data: Tensor) -> Tensor:
    """(..., m * 18) uint8 -> (..., m * 32) float32: fp16(d) * (q - 8)."""
    blocks = data.reshape(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (N, 1)
    packed = blocks[:, 2:]  # (N, 16)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float() - 8  # (N, 32)
    return (q * d).reshape(*data.shape[:-1], data.shape[-1] // 18 * BLOCK)


class Q8_0:
    """8-bit codes, one fp16 scale a block of 32: 8.5 bits a weight. ggml type 8."""
    ggml_type, block_bytes = 8, 34
    quantize, dequantize = staticmethod(quantize_q8_0), staticmethod(dequantize_q8_0)


class Q4_0:
    """4-bit codes, one fp16 scale a block of 32: 4.5 bits a weight. ggml type 2."""
    ggml_type, block_bytes = 2, 18
    quantize, dequantize = staticmethod(quantize_q4_0), staticmethod(dequantize_q4_0)


GGML_BLOCKS = {"q8_0": Q8_0, "q4_0": Q4_0}  # name -> format; bits a weight = 8 * block_bytes / BLOCK


def bits_per_weight(name: str) -> float:
    return 8 * GGML_BLOCKS[name].block_bytes / BLOCK
