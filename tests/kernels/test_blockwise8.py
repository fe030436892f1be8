"""8-bit blockwise dynamic quantization: Triton (interpreted on CPU, compiled on CUDA) == reference == bitsandbytes,
bit for bit. bitsandbytes runs on the CPU; our kernels where their backend runs (helpers.device_for)."""
import bitsandbytes.functional as bnbF
import pytest
import torch
from helpers import bnb_native_cpu, device_for

from nanoft.kernels import dequantize_blockwise8, dynamic_map, quantize_blockwise8

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def quantize(x, code=None, blocksize=256, backend="auto"):
    """quantize_blockwise8 where `backend` runs, codes and absmax brought back to the CPU."""
    dev = device_for(backend)
    q, absmax = quantize_blockwise8(x.to(dev), None if code is None else code.to(dev), blocksize, backend=backend)
    return q.cpu(), absmax.cpu()


def dequantize(q, absmax, code=None, blocksize=256, dtype=torch.float32, backend="auto"):
    dev = device_for(backend)
    return dequantize_blockwise8(q.to(dev), absmax.to(dev), None if code is None else code.to(dev), blocksize, dtype,
                                 backend=backend).cpu()


def bnb_quantize(x, code, blocksize):
    return torch.ops.bitsandbytes.quantize_blockwise.default(x, code, blocksize)


def bnb_dequantize(q, absmax, code, blocksize, dtype):
    if not bnb_native_cpu():  # its PyTorch fallback: float32 maths rounded once, as its C kernel does (helpers)
        return torch.ops.bitsandbytes.dequantize_blockwise.default(q, absmax, code, blocksize, torch.float32).to(dtype)
    return torch.ops.bitsandbytes.dequantize_blockwise.default(q, absmax, code, blocksize, dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality including the sign of zero."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
    ours = dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert same_bits(ours, bnbF.create_dynamic_map(signed))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,blocksize",
    [((1000,), 256), ((33, 17), 64), ((4096,), 4096), ((7,), 32), ((3, 5, 41), 128), ((1,), 256)],
)
def test_matches_bitsandbytes(backend, dtype, shape, blocksize):
    torch.manual_seed(0)
    code = dynamic_map(True)
    x = (torch.randn(shape) * 3).to(dtype)
    q_ref, absmax_ref = bnb_quantize(x, code, blocksize)
    q, absmax = quantize(x, code, blocksize, backend=backend)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert same_bits(absmax, absmax_ref)
    assert torch.equal(q, q_ref)
    for out_dtype in DTYPES:
        ours = dequantize(q, absmax, code, blocksize, out_dtype, backend=backend)
        assert same_bits(ours, bnb_dequantize(q_ref, absmax_ref, code, blocksize, out_dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unsigned_map_and_default_code(backend):
    torch.manual_seed(1)
    x = torch.rand(3000) ** 4  # second-moment-like: non-negative, heavy mass near 0
    code = dynamic_map(False)
    q_ref, absmax_ref = bnb_quantize(x, code, 256)
    q, absmax = quantize(x, code, backend=backend)
    assert torch.equal(q, q_ref) and same_bits(absmax, absmax_ref)
    # code=None means the signed map
    q, absmax = quantize(x - 0.5, backend=backend)
    q_ref, absmax_ref = bnb_quantize(x - 0.5, dynamic_map(True), 256)
    assert torch.equal(q, q_ref) and same_bits(absmax, absmax_ref)


def test_grid_rule_is_the_nearest_code_but_within_a_grid_step_of_a_midpoint():
    """The simple rule (argmin over the codes of |code - x / absmax|) and the lookup grid agree on every element
    that is not within one grid step (2 / 65535) of a midpoint between two codes."""
    torch.manual_seed(3)
    code = dynamic_map(True)
    x = torch.randn(64, 256) * torch.logspace(-4, 0, 64)[:, None]  # blocks of very different scales
    q, absmax = quantize_blockwise8(x.reshape(-1), code, 256, backend="torch")
    scaled = x / absmax[:, None]
    nearest = (scaled[..., None] - code).abs().argmin(dim=-1).reshape(-1)
    mids = 0.5 * (code[:-1] + code[1:])
    near_tie = ((scaled.reshape(-1)[:, None] - mids).abs() < 2 / 65535).any(dim=1)
    assert torch.equal(q.long()[~near_tie], nearest[~near_tie])
    assert near_tie.float().mean() < 0.05  # the exceptions are few


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_near_ties_follow_bitsandbytes(backend):
    """Values placed on the 65536-point grid's rounding edges and on the code midpoints."""
    torch.manual_seed(2)
    code = dynamic_map(True)
    k = torch.randint(0, 65535, (3000,)).double()
    edges = ((k + 0.5) / 65535.0 * 2 - 1).float()
    mids = (0.5 * (code[:-1] + code[1:]))[torch.randint(0, 255, (3000,))]
    x = torch.cat([edges, mids]) * 1.7
    x = x + torch.randint(-2, 3, x.shape) * torch.finfo(torch.float32).eps * x.abs()
    x[::256] = 1.7  # every block's absmax is 1.7
    x = x[:5003]  # a short tail block too
    q_ref, absmax_ref = bnb_quantize(x, code, 256)
    q, absmax = quantize(x, code, 256, backend=backend)
    assert torch.equal(q, q_ref) and same_bits(absmax, absmax_ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_block_and_non_contiguous(backend):
    x = torch.randn(64, 40)
    x[:8] = 0  # the first 320 elements: block 0 (256) is all zero
    x_dev = x.to(device_for(backend))  # the transposed view is taken where the kernel runs (.to() would copy it contiguous)
    for inp, inp_dev in ((x.t(), x_dev.t()), (x, x_dev)):  # x.t() is quantized in its own row-major order
        q, absmax = (t.cpu() for t in quantize_blockwise8(inp_dev, blocksize=256, backend=backend))
        q_ref, absmax_ref = bnb_quantize(inp, dynamic_map(True), 256)
        assert torch.equal(q, q_ref) and same_bits(absmax, absmax_ref)
        out = dequantize(q, absmax, blocksize=256, backend=backend)
        assert not out.isnan().any()
    assert absmax[0] == 0 and (out.reshape(-1)[:256] == 0).all()  # x: zeros in, zeros out


def test_empty_tensor():
    q, absmax = quantize(torch.empty(0, 5), backend="triton")
    assert q.shape == (0, 5) and absmax.shape == (0,)
    assert dequantize(q, absmax, backend="triton").shape == (0, 5)


def test_bad_blockwise8_input_is_a_clear_error():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_blockwise8(x.double())
    with pytest.raises(ValueError, match="power of two"):
        quantize_blockwise8(x, blocksize=100)
    with pytest.raises(ValueError, match="power of two"):
        quantize_blockwise8(x, blocksize=8192)
    with pytest.raises(ValueError, match="shape \\[256\\]"):
        quantize_blockwise8(x, code=torch.zeros(16))
    with pytest.raises(ValueError, match="backend"):
        quantize_blockwise8(x, backend="cuda")
    q, absmax = quantize_blockwise8(x, blocksize=64)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_blockwise8(q.int(), absmax, blocksize=64)
    with pytest.raises(ValueError, match="absmax must be float32 with 2 elements"):
        dequantize_blockwise8(q, absmax[:1], blocksize=64)
