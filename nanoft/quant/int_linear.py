"""Integer weights for post-training quantization: the grid every method rounds onto, and two frozen Linear layers.

The grid (GPTQ's reference quantizer, Frantar et al. 2022, github.com/IST-DASLab/gptq quant.py): a weight w in a
group with scale s and integer zero point z becomes the code q and is read back as w_hat,

    q = clamp(round(w / s) + z, 0, maxq)        w_hat = s * (q - z)

    INT8 (Int8Linear)   symmetric, per output channel: s = max|w| / 127, z = 127, maxq = 254, stored as the
                        signed code q - z in [-127, 127] (int8); w_hat = s * code
    INT4 (Int4Linear)   asymmetric, per group of group_size consecutive input columns of one output row:
                        xmin = min(min w, 0), xmax = max(max w, 0), s = (xmax - xmin) / 15,
                        z = round(-xmin / s) in [0, 15], maxq = 15

RTN (round to nearest) is this rounding applied to the trained weights; GPTQ (nanoft.quant.gptq) chooses the
codes column by column on the same grid; AWQ (nanoft.quant.awq) rescales channels and clips before rounding.

Layouts on disk (state-dict keys of the layers; the bias stays float):

    Int8Linear   weight  int8    (out, in)        the codes
                 scales  float32 (out,)           s per output row
    Int4Linear   qweight uint8   (out, in / 2)    two codes a byte: column 2j in the low nibble, 2j + 1 in the high
                 scales  float32 (out, in / g)    s per group
                 zeros   uint8   (out, in / g)    z per group (0..15)

The same numbers in the two layouts this one is read against:
    AutoGPTQ   qweight int32 (in / 8, out): eight codes along the input dimension, code k of a word in bits 4k..4k+3;
               scales float16 (in / g, out); qzeros int32 (in / g, out / 8) packed the same way along the output,
               w_hat = s * (q - z)  (AutoGPTQ's v1 format stores z - 1 there); g_idx (in,) names each column's
               group (act-order without static groups): nanoft's groups are always consecutive columns
    gpt-fast   int4 group-wise, w_hat = (q - 8) * s + zero_f with a float zero_f, scales_and_zeros (in / g, out, 2):
               ours is zero_f = s * (8 - z). torch's `_weight_int4pack_mm_for_cpu` takes exactly that, so the
               fast path below repacks the codes once (`_convert_weight_to_int4pack_for_cpu`) and keeps them

Reference and fast path: `forward_reference` dequantizes the whole weight and multiplies (plain PyTorch, the
spec); `forward` calls torch's weight-only kernels where they are faster (CPU, bfloat16: `torch._weight_int8pack_mm`,
`torch.ops.aten._weight_int4pack_mm_for_cpu`; see `fast_path`), else the reference.
tests/quant/test_int_linear.py holds them to each other and to nn.Linear; bench/bench_quant_linear.py times them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT4_FAST_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel takes


def grid_params(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """(scale, zero) of each row of w (rows, cols) on the grid of the module docstring: sym gives int8's
    (z = 2^(bits-1) - 1, s = max|w| / z), else the asymmetric min/max grid with 0 inside the range."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    zero_col = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if sym:
        half = 2 ** (bits - 1) - 1
        scale = torch.maximum(w.abs().amax(dim=1), zero_col) / half
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row: any scale reads back 0
        return scale, torch.full_like(scale, half)
    xmin, xmax = torch.minimum(w.amin(dim=1), zero_col), torch.maximum(w.amax(dim=1), zero_col)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both_zero, -1.0, xmin), torch.where(both_zero, 1.0, xmax)
    scale = (xmax - xmin) / (2**bits - 1)
    return scale, torch.round(-xmin / scale)


def max_code(bits: int, sym: bool) -> int:
    return 2**bits - 2 if sym else 2**bits - 1  # symmetric int8 uses 255 codes: [-127, 127]


def to_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """The codes q of w given per-row (broadcast) scale and zero: clamp(round(w / s) + z, 0, maxq)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """w rounded onto the grid and read back: s * (q - z)."""
    return scale * (to_codes(w, scale, zero, maxq) - zero)


def group_params(w: Tensor, bits: int, group_size: int, sym: bool) -> tuple[Tensor, Tensor]:
    """(scale, zero), each (out, in / group_size): the grid of every group of consecutive columns."""
    out, n_in = w.shape
    scale, zero = grid_params(w.reshape(-1, group_size), bits, sym)
    return scale.view(out, n_in // group_size), zero.view(out, n_in // group_size)


def rtn(w: Tensor, bits: int, group_size: int, sym: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Round to nearest: (codes (out, in), scale, zero (out, in / group_size)) of w (out, in)."""
    scale, zero = group_params(w, bits, group_size, sym)
    expand = lambda t: t.repeat_interleave(group_size, dim=1)  # (out, in / g) -> (out, in)
    return to_codes(w.float(), expand(scale), expand(zero), max_code(bits, sym)), scale, zero


def fast_path(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether torch's weight-only kernels are the faster way: on the CPU, in bfloat16 only. In float32 they fall
    back to slow loops, where dequantize + matmul (the reference) is faster. Measured on this project's 2-core
    AVX-512 CPU (busy: ratios only), 768 -> 3072, time over nn.Linear's in the same dtype: one row, float32 int4 19x,
    int8 29x; bfloat16 int4 2.1x, int8 3.1x. 64 rows, float32 70x and 38x; bfloat16 1.6x and 2.2x."""
    return x.device.type == "cpu" and dtype == torch.bfloat16


def _out_dtype(x: Tensor) -> torch.dtype:
    """What nn.Linear would return: autocast's dtype under autocast, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class Int8Linear(nn.Module):
    """A frozen Linear with INT8 weights, one float32 scale per output row: y = x @ (s * q).T + b."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @staticmethod
    def weight_bytes(in_features: int, out_features: int) -> int:
        """Bytes the weight takes on disk and in memory: the int8 codes and a float32 scale a row (bias aside)."""
        return out_features * in_features + 4 * out_features

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, bias: Tensor | None) -> Int8Linear:
        """From the grid's codes q in [0, 254] (zero point 127) and per-row scales (out, 1) or (out,)."""
        out, n_in = codes.shape
        layer = cls(n_in, out, bias is not None, device=codes.device)
        layer.weight.copy_((codes - 127).to(torch.int8))
        layer.scales.copy_(scale.reshape(out).float())
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """RTN: symmetric per-channel rounding of linear's weight."""
        codes, scale, _ = rtn(linear.weight.detach(), 8, linear.in_features, sym=True)
        return cls.from_codes(codes, scale, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight (out, in): s * code."""
        return (self.weight.float() * self.scales[:, None]).to(dtype)

    def forward_reference(self, x: Tensor) -> Tensor:
        dtype = _out_dtype(x)
        return F.linear(x.to(dtype), self.dequantize(dtype), None if self.bias is None else self.bias.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        dtype = _out_dtype(x)
        if not fast_path(x, dtype):
            return self.forward_reference(x)
        x2 = x.to(dtype).reshape(-1, self.in_features)  # (M, in): the kernel takes a matrix
        y = torch._weight_int8pack_mm(x2, self.weight, self.scales.to(dtype))  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """A frozen Linear with INT4 weights, a float32 scale and a 4-bit zero point per group of group_size input
    columns: y = x @ (s * (q - z)).T + b. Two codes a byte on disk (module docstring)."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128, device=None):
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ValueError(f"in_features={in_features} must be a multiple of group_size={group_size} (and even)")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._packed: tuple | None = None  # the fast kernel's copy of the codes, built at the first fast forward

    @staticmethod
    def weight_bytes(in_features: int, out_features: int, group_size: int = 128) -> int:
        """Bytes the weight takes on disk and in memory: half a byte a code, a float32 scale and a uint8 zero a
        group (bias aside)."""
        return out_features * in_features // 2 + 5 * out_features * (in_features // group_size)

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None) -> Int4Linear:
        """From codes (out, in) in [0, 15] and scale, zero (out, in / group_size)."""
        out, n_in = codes.shape
        layer = cls(n_in, out, bias is not None, n_in // scale.shape[1], device=codes.device)
        layer.qweight.copy_(pack_int4(codes.to(torch.uint8)))
        layer.scales.copy_(scale.float())
        layer.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        """RTN: asymmetric group-wise rounding of linear's weight."""
        codes, scale, zero = rtn(linear.weight.detach(), 4, group_size, sym=False)
        return cls.from_codes(codes, scale, zero, linear.bias)

    def codes(self) -> Tensor:
        return unpack_int4(self.qweight)  # (out, in) uint8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight (out, in): s * (q - z), each group's s and z repeated over its columns."""
        expand = lambda t: t.float().repeat_interleave(self.group_size, dim=1)  # (out, in / g) -> (out, in)
        return (expand(self.scales) * (self.codes().float() - expand(self.zeros))).to(dtype)

    def forward_reference(self, x: Tensor) -> Tensor:
        dtype = _out_dtype(x)
        return F.linear(x.to(dtype), self.dequantize(dtype), None if self.bias is None else self.bias.to(dtype))

    def _fast_weight(self) -> tuple[Tensor, Tensor]:
        """(packed codes, scales_and_zeros) for torch's kernel, built once per device (module docstring)."""
        key = (self.qweight.device, self.qweight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr())
        if self._packed is None or self._packed[0] != key:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
            zero_f = self.scales * (8 - self.zeros.float())  # gpt-fast's float zero: (q - 8) * s + zero_f
            sz = torch.stack((self.scales.T, zero_f.T), dim=-1).contiguous()  # (in / g, out, 2)
            self._packed = (key, packed, sz)
        return self._packed[1], self._packed[2]

    def forward(self, x: Tensor) -> Tensor:
        dtype = _out_dtype(x)
        if not fast_path(x, dtype) or self.group_size not in INT4_FAST_GROUPS or self.out_features % 8:
            return self.forward_reference(x)
        packed, sz = self._fast_weight()
        x2 = x.to(dtype).reshape(-1, self.in_features)  # (M, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz.to(dtype))  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


def pack_int4(codes: Tensor) -> Tensor:
    """(out, in) codes 0..15 -> (out, in / 2) bytes: column 2j in the low nibble, 2j + 1 in the high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4: (out, in / 2) bytes -> (out, in) codes."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(packed.shape[0], -1)
