"""8-bit blockwise quantization with the dynamic map, bit-for-bit as bitsandbytes' CPU package does it.

What it computes
----------------
A tensor is cut, in flat (row-major) order, into blocks of `blocksize` elements (the last block may be
short). Each block keeps one float32 scale, its absolute maximum, and each element becomes one byte: the
index of a code in a sorted 256-entry table `code` (values in [-1, 1]):

    absmax[b] = max_i |x[i]|                          over the elements i of block b
    codes[i]  = argmin_k |code[k] - x[i] / absmax[b]|   the nearest code value after dividing by the absmax
    x_hat[i]  = code[codes[i]] * absmax[b]             (float32, then cast to the output dtype)

That is the whole rule. The next section says how bitsandbytes computes "nearest" (a lookup grid that agrees
with the argmin except within ~1.5e-5 of a midpoint between two codes), which is what we match bit for bit.

The default table is the signed dynamic map ("8-bit Approximations for Parallelism in Deep Learning",
Dettmers 2015, arXiv:1511.04561): one sign bit, a run of zero bits whose length is a decimal exponent
(10^0 .. 10^-6), then linearly spaced fraction bits. It is dense near 0 and sparse near +-1, which is what
optimizer states and the QLoRA nested absmax (arXiv:2305.14314, section 3) need.

"Nearest", exactly as bitsandbytes 0.50 on CPU does it
------------------------------------------------------
bitsandbytes' CPU kernel does not search the table per element. It multiplies by the reciprocal of the
absmax, snaps the result onto a 65536-point grid of [-1, 1], and reads the code index from a lookup table
built once per code table:

    v = clamp(x * (1 / absmax), -1, 1)                 # every step rounded to float32
    j = int(((v + 1) * 0.5) * 65535 + 0.5)             # truncation; four separately rounded float ops
    lut[k] = #{ midpoints m : m < -1 + 2k / 65535 }    # midpoints m_i = 0.5 * (code[i] + code[i+1])
    codes = lut[j]

So a value within about 1.5e-5 of a midpoint can land on the farther code; we reproduce that, and a block
whose absmax is 0 gets code 0 everywhere (it dequantizes to 0 * code[0] = -0.0). We follow this format
(not bitsandbytes' CUDA kernel, which binary-searches the table and can differ in those rare near-tie
elements) because it is the one we can run and test against here. NaN and inf inputs are not supported:
bitsandbytes itself gives them no defined meaning; callers (optimizer states, absmax) keep them finite.

Layout: `codes` is uint8 with the input's shape; `absmax` is float32 of shape [ceil(numel / blocksize)].
"""
import torch
from torch import Tensor

from ._triton import tl, triton, use_triton

LUT_SIZE = 65536  # grid points of the [-1, 1] -> code index lookup table (bitsandbytes' kLUTSize)
DEQUANT_TILE = 1024  # elements per Triton program in dequantize (any power of two works)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -----------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def store_rounded(ptr, value, mask, OUT_BF16: tl.constexpr):
    """Store float32 `value` at ptr (its element type), rounding to nearest even.

    fp32 -> bf16 is done by hand: a GPU's cast already rounds to nearest even, but Triton's CPU
    interpreter truncates, and these kernels must match bitsandbytes under the interpreter too.
    """
    if OUT_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 dropped bits (finite inputs)
        tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def quantize_block(x, mask, lut_ptr, LUT_STEPS: tl.constexpr):
    """One block of float32 values in registers -> (uint8 codes, absmax): the grid rule of the module docstring.
    Shared by the quantize kernel below and the fused AdamW8bit update (adamw8bit.py)."""
    x = tl.where(mask, x, 0.0)  # padding lanes must not raise the absmax
    absmax = tl.max(tl.abs(x), axis=0)
    safe = tl.where(absmax == 0.0, 1.0, absmax)  # an all-zero block must not make 0 * inf = NaN indices
    inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), safe)  # IEEE division: plain `/` is approximate on GPU
    v = tl.minimum(tl.maximum(x * inv, -1.0), 1.0)
    j = (((v + 1.0) * 0.5) * LUT_STEPS + 0.5).to(tl.int32)  # truncation, as the C cast; launched with fp fusion off
    q = tl.load(lut_ptr + j, mask=mask, other=0)
    q = tl.where(absmax == 0.0, 0, q)
    return q.to(tl.uint8), absmax


@triton.jit
def _quantize_blockwise8_kernel(
    x_ptr,  # *fp32/fp16/bf16, [n] flat contiguous input
    lut_ptr,  # *uint8, [LUT_SIZE] grid point -> code index (see quantize_lut)
    codes_ptr,  # *uint8, [n] output code indices
    absmax_ptr,  # *fp32, [num_blocks] output per-block absolute maximum
    n,  # number of elements in x
    BLOCKSIZE: tl.constexpr,  # elements per quantization block; one program per block
    LUT_STEPS: tl.constexpr,  # LUT_SIZE - 1: the grid's number of steps across [-1, 1]
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)  # int64: n may exceed 2**31
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q, absmax = quantize_block(x, mask, lut_ptr, LUT_STEPS)
    tl.store(codes_ptr + offs, q, mask=mask)
    tl.store(absmax_ptr + pid, absmax)


@triton.jit
def _dequantize_blockwise8_kernel(
    codes_ptr,  # *uint8, [n] code indices
    absmax_ptr,  # *fp32, [num_blocks] per-block scales
    code_ptr,  # *fp32, [256] code table
    out_ptr,  # *fp32/fp16/bf16, [n] output
    n,  # number of elements
    BLOCKSIZE: tl.constexpr,  # elements per quantization block
    TILE: tl.constexpr,  # elements per program (independent of BLOCKSIZE)
    OUT_BF16: tl.constexpr,  # output is bfloat16: round by hand (see store_rounded)
):
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
    value = tl.load(code_ptr + q) * scale  # float32 product, rounded once, then cast (round to nearest even)
    store_rounded(out_ptr + offs, value, mask, OUT_BF16)


# -----------------------------------------------------------------------------------------------------------
# The code table and its lookup table


def dynamic_map(signed: bool = True) -> Tensor:
    """The 256 sorted float32 values of bitsandbytes' `create_dynamic_map(signed)` (7 exponent bits).

    For each decimal exponent e = 0..6 (scale 10^(e-6)), the midpoints of a linspace(0.1, 1) with 2^e
    (signed) or 2^(e+1) (unsigned) intervals; signed adds the negatives. Then 0 and 1.
    """
    data = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _build_lut(code: Tensor) -> Tensor:
    """[LUT_SIZE] uint8: grid point k (value -1 + 2k/65535, in float32) -> index of the nearest code."""
    midpoints = 0.5 * (code[:-1] + code[1:])  # [255]
    k = torch.arange(LUT_SIZE, device=code.device, dtype=torch.float32)
    grid = -1.0 + (2.0 * k) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)  # = #{midpoints < grid}


_MAPS: dict = {}  # (signed, device) -> dynamic map on that device
_LUTS: dict = {}  # (device, data_ptr, version) -> (code, lut); holding `code` keeps its memory from reuse


def dynamic_map_on(device: torch.device | str, signed: bool = True) -> Tensor:
    """dynamic_map(signed) on `device`, made once per device and shared (never modify it)."""
    key = (signed, str(device))
    if key not in _MAPS:
        _MAPS[key] = dynamic_map(signed).to(device)
    return _MAPS[key]


def quantize_lut(code: Tensor) -> Tensor:
    """The lookup table of `code` (see the module docstring), built once per table and device."""
    key = (str(code.device), code.data_ptr(), code._version)
    if key not in _LUTS:
        if len(_LUTS) >= 16:  # a handful of tables is all anyone uses; forget the oldest
            _LUTS.pop(next(iter(_LUTS)))
        _LUTS[key] = (code, _build_lut(code))
    return _LUTS[key][1]


# -----------------------------------------------------------------------------------------------------------
# Wrappers


def check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")


def _check_code(code: Tensor | None, device: torch.device) -> Tensor:
    if code is None:
        return dynamic_map_on(device)
    if code.dtype != torch.float32 or code.shape != (256,):
        raise ValueError(f"code must be a float32 tensor of shape [256], got {code.dtype} {tuple(code.shape)}")
    if code.device != device:
        raise ValueError(f"code is on {code.device} but the tensor is on {device}")
    return code.contiguous()


def quantize_blockwise8(
    x: Tensor, code: Tensor | None = None, blocksize: int = 256, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Quantize x to (codes uint8 with x's shape, absmax float32 [ceil(numel / blocksize)])."""
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float32, float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    check_blocksize(blocksize)
    code = _check_code(code, x.device)
    x = x.detach()
    if not use_triton(backend, x.device):
        return quantize_blockwise8_reference(x, code, blocksize)
    flat = x.reshape(-1).contiguous()  # copies only a non-contiguous input
    n = flat.numel()
    num_blocks = triton.cdiv(n, blocksize)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=x.device)
    if n > 0:
        _quantize_blockwise8_kernel[(num_blocks,)](
            flat, quantize_lut(code), codes, absmax, n,
            BLOCKSIZE=blocksize, LUT_STEPS=float(LUT_SIZE - 1), enable_fp_fusion=False,
        )
    return codes.view(x.shape), absmax


def dequantize_blockwise8(
    codes: Tensor,
    absmax: Tensor,
    code: Tensor | None = None,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Tensor:
    """Inverse of quantize_blockwise8: code[codes] * absmax[block], as `dtype`, with codes' shape."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    check_blocksize(blocksize)
    n = codes.numel()
    if absmax.dtype != torch.float32 or absmax.numel() != triton.cdiv(n, blocksize):
        raise ValueError(
            f"absmax must be float32 with {triton.cdiv(n, blocksize)} elements for {n} codes in blocks of "
            f"{blocksize}, got {absmax.dtype} with {absmax.numel()}"
        )
    code = _check_code(code, codes.device)
    if not use_triton(backend, codes.device):
        return dequantize_blockwise8_reference(codes, absmax, code, blocksize, dtype)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    if n > 0:
        grid = (triton.cdiv(n, DEQUANT_TILE),)
        _dequantize_blockwise8_kernel[grid](
            codes.reshape(-1).contiguous(), absmax.reshape(-1).contiguous(), code, out, n,
            BLOCKSIZE=blocksize, TILE=DEQUANT_TILE, OUT_BF16=dtype == torch.bfloat16, enable_fp_fusion=False,
        )
    return out.view(codes.shape)


# -----------------------------------------------------------------------------------------------------------
# Plain PyTorch reference: the readable specification the kernels are held to


def padded_blocks(x: Tensor, blocksize: int) -> tuple[Tensor, int]:
    """x flattened to float32 rows of blocksize, the tail zero-padded: ((num_blocks, blocksize), numel)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    num_blocks = -(-n // blocksize)
    padded = torch.zeros(num_blocks * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    return padded.view(num_blocks, blocksize), n


def quantize_blockwise8_reference(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Each element's code is the nearest code value to x / absmax of its block. "Nearest" is taken the way
    bitsandbytes' CPU kernel takes it (module docstring): x * (1 / absmax), snapped to the 65,536-point grid,
    read from the lookup table. tests/kernels/test_blockwise8.py checks this against the plain argmin over the codes."""
    blocks, n = padded_blocks(x, blocksize)  # (num_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (num_blocks,)
    return quantize_blocks(blocks, absmax, code).reshape(-1)[:n].view(x.shape), absmax


def quantize_blocks(blocks: Tensor, absmax: Tensor, code: Tensor) -> Tensor:
    """Codes of float32 `blocks` (num_blocks, blocksize) given each block's absmax: the grid rule above.
    (The FSDP optimizer calls it with maxima taken across ranks: nanoft.optim.sharded.)"""
    inv = 1.0 / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    j = (((v + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, as the C cast does
    q = quantize_lut(code)[j]
    return torch.where(absmax[:, None] == 0, torch.zeros_like(q), q)


def dequantize_blockwise8_reference(
    codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype
) -> Tensor:
    flat = code[codes.reshape(-1).long()]  # (n,) float32
    scale = absmax.reshape(-1).repeat_interleave(blocksize)[: flat.numel()]  # absmax[i // blocksize]
    return (flat * scale).to(dtype).view(codes.shape)
