"""NF4 (4-bit NormalFloat) blockwise quantization with optional double quantization, as bitsandbytes does it.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores a frozen base weight in 4 bits per value:

    absmax[b] = max_i |w[i]|                    over the `blocksize` elements i of block b (flat order)
    codes[i]  = index of the NF4 value nearest to w[i] / absmax[b]
    w_hat[i]  = NF4[codes[i]] * absmax[b]

NF4 is 16 fixed values in [-1, 1], exact zero at index 7: quantiles of N(0, 1) at evenly spaced probabilities,
divided by the largest (QLoRA section 3). They are stored as bitsandbytes' `get_4bit_type("nf4")` has them;
tests/kernels/test_nf4_kernels.py derives them from the quantile construction and checks the table bit for bit.

Format (identical to `bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4")` on CPU)
---------------------------------------------------------------------------------------------------
- `packed`: uint8 [ceil(numel / 2)]. Byte j holds element 2j in its HIGH nibble and element 2j+1 in its
  low nibble. An odd numel pads one zero, so the last low nibble is 7 (code 0.0).
- `absmax`: float32 [ceil(numel / blocksize)], one per block, blocks taken in flat row-major order; the
  last block may be short.
- "Nearest": threshold at the midpoints m_k = (NF4[k] + NF4[k+1]) / 2 (float32), code = #{k : m_k < y};
  an exact tie goes to the lower code. y = clamp(w * (1 / max(absmax, 1e-38)), -1, 1) for full blocks;
  bitsandbytes' CPU path *divides* by the absmax in a short tail block, y = w / max(absmax, 1e-38), and
  stores the clamped absmax (1e-38, not 0) for an all-zero tail block. We do the same, to be bit-exact.
- Double quantization (QLoRA section 3, `compress_statistics=True`): offset = mean(absmax) (torch.mean, float32);
  absmax - offset is quantized to 8 bits with the signed dynamic map in blocks of 256 (kernels/blockwise8.py);
  kept: uint8 absmax codes, float32 nested absmax [ceil(num_blocks / 256)], the offset. Dequantizing
  rebuilds absmax = (code8[q] * nested_absmax[b // 256]) + offset, each step rounded to float32 (kernels
  are launched with FMA contraction off so the GPU rounds the same way).
- Dequantize: NF4[code] * absmax in float32, then one rounding to the output dtype (nearest even).

Bits per parameter at blocksize 64: 4 + 32/64 = 4.5 without double quantization, and
4 + 8/64 + 32/(64*256) = 4.127 with it (plus 32 bits of offset per tensor).

Edge cases: an all-zero block has absmax 0 and dequantizes to zeros (never NaN); NaN or inf input is
rejected with a ValueError (the reference would otherwise produce garbage codes silently).
On CUDA, bitsandbytes' own kernels multiply by the reciprocal in the tail block too, and its 8-bit nested
quantizer searches the code table instead of using the CPU's lookup grid; we follow the CPU package (the one
these tests can run), so a CUDA bitsandbytes output may differ from ours in those rare elements.

Backends: backend="auto" runs the Triton kernels below on CUDA and the C kernel of kernels/nf4_cpu.py on the
CPU (the reference where no C compiler works); "triton" and "torch" force the kernel or the reference.
"""
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import nf4_cpu
from ._triton import tl, triton, use_triton
from .blockwise8 import (
    FLOAT_DTYPES,
    check_blocksize,
    dequantize_blockwise8_reference,
    dynamic_map_on,
    padded_blocks,
    quantize_blockwise8,
    store_rounded,
)

NF4_VALUES = [  # bitsandbytes/functional.py get_4bit_type("nf4"): sorted, index 7 is exactly 0
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
NESTED_BLOCKSIZE = 256  # double quantization: absmax values per 8-bit block (fixed, as in bitsandbytes)
ABSMAX_FLOOR = 1e-38  # bitsandbytes clamps the absmax it divides by to this (a float32 subnormal)
QUANT_TILE_ELEMENTS = 2048  # elements per program in quantize: max(1, 2048 // blocksize) blocks each
DEQUANT_BYTES = 4096  # packed bytes (8192 outputs) per dequantize program: whole blocks up to 4096 elements
DEQUANT_WARPS = 4


@dataclass
class NF4State:
    """A quantized tensor: what `quantize_nf4` returns and `dequantize_nf4` reads."""

    packed: Tensor  # uint8 [ceil(numel / 2)]: element 2j -> high nibble of byte j, 2j+1 -> low nibble
    absmax: Tensor  # float32 [num_blocks]; uint8 [num_blocks] (8-bit codes) when double quantized
    shape: torch.Size  # the original tensor's shape
    dtype: torch.dtype  # the original tensor's dtype (the default dequantize dtype)
    blocksize: int  # elements per absmax block
    offset: Tensor | None = None  # float32 []: mean of the float absmax (double quantization only)
    nested_absmax: Tensor | None = None  # float32 [ceil(num_blocks / 256)] (double quantization only)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "NF4State":
        move = lambda t: None if t is None else t.to(device)
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), offset=move(self.offset),
                       nested_absmax=move(self.nested_absmax))


# -----------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _quantize_nf4_kernel(
    x_ptr,  # *fp32/fp16/bf16, [n] flat contiguous input
    bounds_ptr,  # *fp32, [15] midpoints between consecutive NF4 values
    packed_ptr,  # *uint8, [nbytes] output, two codes per byte, even element high
    absmax_ptr,  # *fp32, [num_blocks] output per-block absmax
    n,  # number of elements
    nbytes,  # ceil(n / 2), its own argument so that Triton sees it divisible by 16 and vectorizes
    num_blocks,  # ceil(n / BLOCKSIZE)
    BLOCKSIZE: tl.constexpr,  # elements per quantization block (power of two, 32..4096)
    ROWS: tl.constexpr,  # quantization blocks handled by one program, one per tile row
    FLOOR: tl.constexpr,  # ABSMAX_FLOOR: the smallest absmax divided by
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (ROWS, BLOCKSIZE), contiguous loads
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)  # (ROWS,)
    # the floor as an fp32 tensor: Triton 3.6 types a Python float below fp32's smallest normal (1e-38 is one)
    # as fp64, which div_rn then rejects on CUDA (Triton 3.9 and the interpreter accept it)
    floor = tl.full([ROWS], FLOOR, tl.float32)
    scale = tl.maximum(absmax, floor)[:, None]  # (ROWS, 1)
    inv = tl.math.div_rn(tl.full([ROWS, 1], 1.0, tl.float32), scale)  # IEEE division, as torch does
    tail = ((rows + 1) * BLOCKSIZE > n)[:, None]  # the short last block divides instead (bitsandbytes CPU)
    y = tl.where(tail, tl.math.div_rn(x, scale), x * inv)
    y = tl.minimum(tl.maximum(y, -1.0), 1.0)
    q = tl.zeros([ROWS, BLOCKSIZE], dtype=tl.int32)
    for k in tl.static_range(15):  # code = number of midpoints strictly below y: a tie goes down
        q += (y > tl.load(bounds_ptr + k)).to(tl.int32)
    high, low = tl.split(tl.reshape(q, (ROWS, HALF, 2)))  # even elements go in the high nibble
    boffs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF) byte indices
    tl.store(packed_ptr + boffs, ((high << 4) | low).to(tl.uint8), mask=boffs < nbytes)
    stored = tl.where(((rows + 1) * BLOCKSIZE > n), tl.maximum(absmax, floor), absmax)
    tl.store(absmax_ptr + rows, stored, mask=rows < num_blocks)


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,  # *uint8, [nbytes] packed codes
    absmax_ptr,  # *fp32 [num_blocks] absmax; or *uint8 [num_blocks] 8-bit codes if DOUBLE_QUANT
    nested_absmax_ptr,  # *fp32, [ceil(num_blocks / NESTED)] (read only if DOUBLE_QUANT)
    code8_ptr,  # *fp32, [256] signed dynamic map (read only if DOUBLE_QUANT)
    offset_ptr,  # *fp32, [1] mean absmax added back (read only if DOUBLE_QUANT)
    pairs_ptr,  # *int64, [256] byte -> its two NF4 values: high nibble's float32 bits low, low nibble's high
    out_ptr,  # *fp32/fp16/bf16, [n] output
    n,  # number of elements
    nbytes,  # ceil(n / 2): its own argument so that Triton sees it divisible by 16 and vectorizes the loads
    BLOCKSIZE: tl.constexpr,  # elements per absmax block
    DOUBLE_QUANT: tl.constexpr,  # absmax is itself 8-bit quantized
    NESTED: tl.constexpr,  # absmax values per nested block (256)
    BYTES: tl.constexpr,  # packed bytes per program (a multiple of BLOCKSIZE // 2)
    OUT_BF16: tl.constexpr,  # output is bfloat16: round by hand (see blockwise8.store_rounded)
):
    """One program: BYTES packed bytes -> 2 * BYTES outputs, as a (blocks, BLOCKSIZE) tile.

    Memory-bound, so every global access is one wide, coalesced instruction: each thread loads the few
    packed bytes behind one 128-bit store of output (4 bytes for 16-bit outputs, 2 for float32: the
    max_contiguous hint tells Triton so, and then no shuffle through shared memory is needed between the
    load and the store); the absmax is loaded once per block; the byte -> (value, value) lookup reads a
    256-entry table that Triton stages once per program in shared memory (tl.gather), one 64-bit read
    per byte instead of two global loads per element.
    """
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per absmax block
    ROWS: tl.constexpr = BYTES // HALF  # absmax blocks per program
    VEC: tl.constexpr = 64 // out_ptr.dtype.element_ty.primitive_bitwidth  # bytes behind 16 output bytes
    pid = tl.program_id(0).to(tl.int64)
    packed_ptr += pid * BYTES  # 64-bit program offsets; the per-element offsets below stay 32-bit
    out_ptr += pid * (2 * BYTES)
    bytes_left = tl.minimum(nbytes - pid * BYTES, BYTES).to(tl.int32)
    left = tl.minimum(n - pid * (2 * BYTES), 2 * BYTES).to(tl.int32)  # outputs left for this program
    rows = tl.arange(0, ROWS)  # (ROWS,) this program's absmax blocks
    boffs = tl.max_contiguous(rows[:, None] * HALF + tl.arange(0, HALF)[None, :], [1, VEC])  # (ROWS, HALF)
    byte = tl.load(packed_ptr + boffs, mask=boffs < bytes_left, other=0).to(tl.int32)
    block = pid * ROWS + rows
    if DOUBLE_QUANT:  # absmax = code8[q8] * nested_absmax + offset, each step rounded (fp fusion off)
        q8 = tl.load(absmax_ptr + block, mask=rows * BLOCKSIZE < left, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED, mask=rows * BLOCKSIZE < left, other=0.0)
        scale = tl.load(code8_ptr + q8) * nested + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=rows * BLOCKSIZE < left, other=0.0)
    pairs = tl.load(pairs_ptr + tl.arange(0, 256))
    pair = tl.reshape(tl.gather(pairs, tl.reshape(byte, (BYTES,)), 0), (ROWS, HALF))  # (ROWS, HALF) int64
    first = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)  # the high nibble's value
    second = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)  # the low nibble's value
    value = tl.reshape(tl.join(first, second), (ROWS, BLOCKSIZE)) * scale[:, None]  # interleaved: 2j, 2j+1
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    store_rounded(out_ptr + offs, value, offs < left, OUT_BF16)


# -----------------------------------------------------------------------------------------------------------
# Tables

_TABLES: dict = {}  # device -> (nf4 values [16], midpoints [15], byte pairs [256])


def _nf4_tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """NF4 values, the midpoints quantize compares with, and what dequantize reads: per byte value b, the
    float32 pair (NF4[b >> 4], NF4[b & 15]) viewed as one int64 (little-endian: the first value low)."""
    key = str(device)
    if key not in _TABLES:
        nf4 = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
        byte = torch.arange(256, device=device)
        pairs = torch.stack([nf4[byte >> 4], nf4[byte & 0xF]], dim=1)  # (256, 2): high nibble first
        _TABLES[key] = (nf4, (nf4[:-1] + nf4[1:]) / 2, pairs.view(torch.int64).view(256))  # midpoints as bnb
    return _TABLES[key]


def fast_cpu(backend: str, device: torch.device) -> bool:
    """"auto" on the CPU takes the C kernel of kernels/nf4_cpu.py where it builds; "torch" keeps the reference,
    to read or to test against."""
    return backend == "auto" and device.type == "cpu" and nf4_cpu.available()


def _require_finite(t: Tensor) -> None:
    if not torch.isfinite(t).all():  # one pass and a CPU-GPU sync: fine for a one-off weight quantization
        raise ValueError("x contains NaN or inf; NF4 blocks need a finite absmax")


# -----------------------------------------------------------------------------------------------------------
# Wrappers


def quantize_nf4(x: Tensor, blocksize: int = 64, double_quant: bool = False, backend: str = "auto") -> NF4State:
    """Quantize a float32/float16/bfloat16 tensor of any shape to NF4 (see the module docstring)."""
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float32, float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    check_blocksize(blocksize)
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(x.shape)})")
    x = x.detach()  # weights are quantized, never differentiated through
    cpu_kernel = fast_cpu(backend, x.device)
    if not cpu_kernel:
        _require_finite(x)
    _, bounds, _ = _nf4_tables(x.device)
    if use_triton(backend, x.device):
        flat = x.reshape(-1).contiguous()  # copies only a non-contiguous input
        n = flat.numel()
        num_blocks = triton.cdiv(n, blocksize)
        rows = max(1, QUANT_TILE_ELEMENTS // blocksize)
        packed = torch.empty(triton.cdiv(n, 2), dtype=torch.uint8, device=x.device)
        absmax = torch.empty(num_blocks, dtype=torch.float32, device=x.device)
        _quantize_nf4_kernel[(triton.cdiv(num_blocks, rows),)](
            flat, bounds, packed, absmax, n, packed.numel(), num_blocks, BLOCKSIZE=blocksize, ROWS=rows,
            FLOOR=ABSMAX_FLOOR,
            enable_fp_fusion=False,
        )
    elif cpu_kernel:
        flat = x.reshape(-1).contiguous()
        full = flat.numel() // blocksize * blocksize  # whole blocks: the C kernel; a short last one: the reference
        packed, absmax = nf4_cpu.quantize_nf4_cpu(flat[:full], blocksize, bounds, ABSMAX_FLOOR)
        if full < flat.numel():
            tail_packed, tail_absmax = quantize_nf4_reference(flat[full:], blocksize, bounds)
            packed, absmax = torch.cat([packed, tail_packed]), torch.cat([absmax, tail_absmax])
        _require_finite(absmax)  # a NaN or inf anywhere in x shows in its block's absmax: no second pass over x
    else:
        packed, absmax = quantize_nf4_reference(x, blocksize, bounds)
    state = NF4State(packed=packed, absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize)
    if double_quant:
        # the mean on the CPU, whatever the device: float32 sums depend on their order, and torch's CUDA mean
        # adds in another order than its CPU mean (which bitsandbytes' CPU path and our reference use), so a
        # GPU mean would shift the offset by an ulp and every nested code with it (seen on an H100). One copy of
        # num_blocks floats per weight, once, when the model is quantized.
        offset = absmax.cpu().mean().to(absmax.device)
        qabsmax, nested_absmax = quantize_blockwise8(
            absmax - offset, dynamic_map_on(x.device), NESTED_BLOCKSIZE, backend=backend
        )
        state = replace(state, absmax=qabsmax, offset=offset, nested_absmax=nested_absmax)
    return state


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python: triton.cdiv is a JIT function, ~5 us a call, and this runs on every
    dequantize (a 768x768 weight's whole dequantize on a CPU takes ~60 us)."""
    return -(-a // b)


def _check_state(q: NF4State) -> None:
    if not isinstance(q, NF4State):
        raise TypeError(f"expected an NF4State, got {type(q).__name__}")
    check_blocksize(q.blocksize)
    n, num_blocks = q.numel, _cdiv(q.numel, q.blocksize)
    if q.packed.dtype != torch.uint8 or q.packed.numel() != _cdiv(n, 2):
        raise ValueError(f"packed must be uint8 with {_cdiv(n, 2)} bytes for shape {tuple(q.shape)}, "
                         f"got {q.packed.dtype} with {q.packed.numel()}")
    want = torch.uint8 if q.double_quant else torch.float32
    if q.absmax.dtype != want or q.absmax.numel() != num_blocks:
        raise ValueError(f"absmax must be {want} with {num_blocks} values, got {q.absmax.dtype} "
                         f"with {q.absmax.numel()}")
    if q.double_quant and (q.offset is None or q.offset.numel() != 1
                           or q.nested_absmax.numel() != _cdiv(num_blocks, NESTED_BLOCKSIZE)):
        raise ValueError("double-quantized state needs a scalar offset and "
                         f"{_cdiv(num_blocks, NESTED_BLOCKSIZE)} nested absmax values")


def dequantize_nf4(q: NF4State, dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """Rebuild the tensor: NF4[code] * absmax, in `dtype` (default: the dtype that was quantized)."""
    _check_state(q)
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    nf4, _, pairs = _nf4_tables(q.device)
    if fast_cpu(backend, q.device):
        return _dequantize_on_cpu(q, dtype, nf4, pairs)
    if not use_triton(backend, q.device):
        return dequantize_nf4_reference(q, dtype, nf4)
    n = q.numel
    out = torch.empty(n, dtype=dtype, device=q.device)
    dummy = q.absmax  # pointers the kernel never reads when DOUBLE_QUANT is off
    _dequantize_nf4_kernel[(triton.cdiv(q.packed.numel(), DEQUANT_BYTES),)](
        q.packed, q.absmax,
        q.nested_absmax if q.double_quant else dummy,
        dynamic_map_on(q.device) if q.double_quant else dummy,
        q.offset.reshape(1).float() if q.double_quant else dummy,
        pairs, out, n, q.packed.numel(),
        BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant, NESTED=NESTED_BLOCKSIZE, BYTES=DEQUANT_BYTES,
        OUT_BF16=dtype == torch.bfloat16, num_warps=DEQUANT_WARPS, enable_fp_fusion=False,
    )
    return out.view(q.shape)


def _dequantize_on_cpu(q: NF4State, dtype: torch.dtype, nf4: Tensor, pairs: Tensor) -> Tensor:
    """The C kernel of kernels/nf4_cpu.py for the whole blocks (a double-quantized absmax rebuilt in the same pass);
    a short last block by the reference's formula."""
    n, bs = q.numel, q.blocksize
    full = n // bs * bs
    out = torch.empty(n, dtype=dtype)
    stats = None
    if q.double_quant:
        stats = (q.nested_absmax.contiguous(), dynamic_map_on(q.device), q.offset.item(), NESTED_BLOCKSIZE)
    nf4_cpu.dequantize_nf4_cpu(q.packed.contiguous(), q.absmax.contiguous()[: full // bs], bs, nf4, out, stats)
    if full < n:
        absmax = q.absmax[-1:].float()
        if q.double_quant:
            absmax = nf4_cpu.double_quant_absmax(q.absmax.contiguous(), q.nested_absmax.contiguous(),
                                                 dynamic_map_on(q.device), q.offset, NESTED_BLOCKSIZE)[-1:]
        tail = pairs.index_select(0, q.packed[full // 2:].int()).view(torch.float32)[: n - full]
        out[full:] = (tail * absmax).to(dtype)
    return out.view(q.shape)


# -----------------------------------------------------------------------------------------------------------
# Plain PyTorch reference: the readable specification the kernels are held to


def quantize_nf4_reference(x: Tensor, blocksize: int, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """(packed uint8 [ceil(n/2)], absmax float32 [num_blocks]), exactly as bitsandbytes' CPU path."""
    blocks, n = padded_blocks(x, blocksize)  # (num_blocks, blocksize), zero-padded tail
    absmax = blocks.abs().amax(dim=1)  # (num_blocks,)
    scale = absmax.clamp(min=ABSMAX_FLOOR)
    y = blocks * (1.0 / scale)[:, None]  # multiply by the reciprocal...
    if n % blocksize:
        y[-1] = blocks[-1] / scale[-1]  # ...except in a short tail block, which divides
        absmax[-1] = scale[-1]  # and keeps the clamped absmax
    y = y.clamp(-1.0, 1.0)
    codes = torch.bucketize(y, bounds).view(-1)[: 2 * -(-n // 2)].to(torch.uint8)  # #{bounds < y}; pad -> 7
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),): even element in the high nibble
    return packed, absmax


def dequantize_nf4_reference(q: NF4State, dtype: torch.dtype, nf4: Tensor) -> Tensor:
    n, bs = q.numel, q.blocksize
    absmax = q.absmax
    if q.double_quant:
        absmax = dequantize_blockwise8_reference(
            q.absmax, q.nested_absmax, dynamic_map_on(q.device), NESTED_BLOCKSIZE, torch.float32
        ) + q.offset
    byte = torch.arange(256, device=q.device)
    pairs = torch.stack([nf4[byte >> 4], nf4[byte & 0xF]], dim=1)  # (256, 2): a byte's two values, high first
    values = pairs.index_select(0, q.packed.int()).view(-1)[:n]  # (n,) float32
    if n % bs == 0:
        out = values.view(-1, bs) * absmax[:, None]  # (num_blocks, blocksize)
    else:
        out = values * absmax.repeat_interleave(bs)[:n]  # absmax[i // blocksize]
    return out.to(dtype).view(q.shape)
