"""NF4 quantization: Triton (interpreted on CPU, compiled on CUDA) == reference == bitsandbytes, bit for bit.

One bitsandbytes 0.50.2 CPU bug is worked around: its C dequantize_4bit kernel, on its vectorized path
(last dimension a multiple of 16), indexes absmax per row as if every row started a new block, so when the
last dimension is not a multiple of the blocksize it scales elements with the wrong absmax (it disagrees with
its own quantize and with its own pure-PyTorch dequantize). For those shapes we compare with bitsandbytes'
pure-PyTorch dequantize (backends/default); `test_bitsandbytes_cpu_dequantize_row_bug` pins the bug down.
Likewise for tensors of 3+ dimensions and at most 2 elements, where its dequantize_4bit fails (it calls .t()
on the output when the packed tensor has a single row).

bitsandbytes' CPU dequantize falls back, for an odd last dimension or blocksize >= 2048 on AVX-512 machines,
to a PyTorch function it wraps in torch.compile; compiling it costs seconds per shape, so the bitsandbytes
calls here run with dynamo disabled (the same function, eager).
"""
import math

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.functional import QuantState
from helpers import bnb_native_cpu, device_for
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoft.kernels import NF4State, dequantize_nf4, dynamic_map, quantize_nf4
from nanoft.kernels.nf4 import NF4_VALUES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton", "auto"]  # auto: the C kernel on the CPU (kernels/nf4_cpu.py)


def quantize(x, blocksize=64, double_quant=False, backend="auto"):
    """quantize_nf4 on the device where `backend` runs (helpers.device_for), the state brought back to the CPU."""
    return quantize_nf4(x.to(device_for(backend)), blocksize, double_quant, backend=backend).to("cpu")


def dequantize(q, dtype=None, backend="auto"):
    return dequantize_nf4(q.to(device_for(backend)), dtype, backend=backend).cpu()


def bnb_quantize(x, blocksize, double_quant):
    return bnbF.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_cpu_row_bug(shape, blocksize) -> bool:
    """Shapes on which bitsandbytes' C dequantize_4bit scales with the wrong absmax (module docstring)."""
    return len(shape) > 0 and shape[-1] % 16 == 0 and shape[-1] % blocksize != 0 and blocksize < 2048


def bnb_dequantize(packed, state, dtype, allow_row_bug=False):
    if not bnb_native_cpu() and dtype != torch.float32:  # its PyTorch fallback: see conftest.bnb_native_cpu
        return bnb_dequantize(packed, state, torch.float32, allow_row_bug).to(dtype)
    state.dtype = dtype
    with torch._dynamo.config.patch(disable=True):
        tiny_nd = packed.shape[0] == 1 and len(state.shape) > 2  # its [1, n] back-compat shim calls .t() on 3-D
        if allow_row_bug or not (bnb_cpu_row_bug(state.shape, state.blocksize) or tiny_nd):
            return bnbF.dequantize_4bit(packed, state).reshape(state.shape)  # 1-D comes back [1, n]
        absmax = state.absmax  # what bnbF.dequantize_4bit does before its kernel, then the PyTorch kernel
        if state.nested:
            absmax = bnbF.dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        code = torch.tensor(NF4_VALUES)
        return _dequantize_4bit_compute(packed.view(-1), absmax, code, state.blocksize, state.shape, dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality including the sign of zero."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_format(q: NF4State, packed_ref: torch.Tensor, state_ref: QuantState):
    assert torch.equal(q.packed, packed_ref.view(-1))
    assert same_bits(q.absmax, state_ref.absmax)
    if q.double_quant:
        assert same_bits(q.offset, state_ref.offset)
        assert same_bits(q.nested_absmax, state_ref.state2.absmax)
        assert same_bits(state_ref.state2.code, dynamic_map(True))
    else:
        assert state_ref.state2 is None


def as_bnb_state(q: NF4State) -> QuantState:
    """Our state in bitsandbytes' container, to feed our output to its dequantize."""
    state2 = None
    if q.double_quant:
        state2 = QuantState(absmax=q.nested_absmax, code=bnbF.create_dynamic_map(True), blocksize=256,
                            dtype=torch.float32)
    return QuantState(absmax=q.absmax, shape=q.shape, code=torch.tensor(NF4_VALUES), blocksize=q.blocksize,
                      quant_type="nf4", dtype=q.dtype, offset=q.offset, state2=state2)


def check_against_bnb(x: torch.Tensor, blocksize: int, double_quant: bool, backend: str, out_dtypes=DTYPES):
    packed_ref, state_ref = bnb_quantize(x.cpu(), blocksize, double_quant)
    q = quantize(x, blocksize, double_quant, backend=backend)
    assert q.shape == x.shape and q.dtype == x.dtype and q.blocksize == blocksize
    assert_same_format(q, packed_ref, state_ref)
    for dtype in out_dtypes:
        ref = bnb_dequantize(packed_ref, state_ref, dtype)
        ours = dequantize(q, dtype, backend=backend)
        assert same_bits(ours, ref), f"dequantize to {dtype} differs"
        assert same_bits(bnb_dequantize(q.packed.view(-1, 1), as_bnb_state(q), dtype), ref)  # bnb reads ours
    return q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(
    "shape,blocksize",
    [((64, 64), 64), ((33, 17), 32), ((3, 5, 41), 128), ((1,), 64), ((7,), 32), ((40, 300), 256),
     ((48, 48), 512), ((40, 52), 1024), ((50, 50), 2048), ((4096,), 4096), ((70, 130), 64), ((1, 1, 2), 32)],
)
def test_matches_bitsandbytes(backend, dtype, double_quant, shape, blocksize):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 0.05).to(dtype)
    check_against_bnb(x, blocksize, double_quant, backend, out_dtypes=[torch.float32, dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_quant_spans_several_nested_blocks(backend):
    torch.manual_seed(1)
    x = torch.randn(300, 130) * torch.rand(300, 1)  # 609 blocks of 64 -> 3 nested blocks of 256, varied scales
    check_against_bnb(x, 64, True, backend)


@pytest.mark.skipif(not bnb_native_cpu(), reason="the bug is in bitsandbytes' C CPU kernel, which its CUDA build does not run")
def test_bitsandbytes_cpu_dequantize_row_bug():
    """bitsandbytes' C kernel disagrees with its own PyTorch dequantize here; we agree with the latter."""
    x = torch.randn(48, 48)  # 2304 values, blocks of 512 cross rows
    packed_ref, state_ref = bnb_quantize(x, 512, False)
    buggy = bnb_dequantize(packed_ref, state_ref, torch.float32, allow_row_bug=True)
    spec = bnb_dequantize(packed_ref, state_ref, torch.float32)
    ours = dequantize(quantize(x, 512))
    assert same_bits(ours, spec) and not torch.equal(buggy, spec)
    assert (ours - x).abs().max() < (buggy - x).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_our_dequantize_reads_bitsandbytes_output(backend):
    torch.manual_seed(2)
    x = torch.randn(37, 29, dtype=torch.bfloat16)
    for double_quant in (False, True):
        packed_ref, state_ref = bnb_quantize(x, 64, double_quant)
        q = NF4State(packed=packed_ref.view(-1), absmax=state_ref.absmax, shape=x.shape, dtype=x.dtype,
                     blocksize=64, offset=state_ref.offset,
                     nested_absmax=state_ref.state2.absmax if double_quant else None)
        for dtype in DTYPES:
            assert same_bits(dequantize(q, dtype, backend=backend), bnb_dequantize(packed_ref, state_ref, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_edges(backend):
    """Values exactly on the midpoints (ties go to the lower code), at +-absmax, and tiny ones."""
    nf4 = torch.tensor(NF4_VALUES)
    mids = (nf4[:-1] + nf4[1:]) / 2
    row = torch.cat([mids, -mids, nf4, torch.tensor([1e-30, -1e-30, 0.0, 1.0, -1.0])])  # 51 values, max 1
    x = torch.cat([row, torch.zeros(13)]).repeat(5) * 0.37  # 320 values, 5 blocks of 64
    check_against_bnb(x, 64, False, backend)
    check_against_bnb(x[:-1] * 3, 32, True, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_blocks_give_zeros(backend):
    x = torch.randn(10, 64)
    x[3] = 0  # a whole block
    x = torch.cat([x.view(-1), torch.zeros(10)])  # and an all-zero tail block
    for double_quant in (False, True):
        q = check_against_bnb(x, 64, double_quant, backend)
        out = dequantize(q, backend=backend)
        assert not out.isnan().any()
        assert (out[3 * 64:4 * 64] == 0).all() and (out[-10:] == 0).all()
    q = quantize(x, 64, backend=backend)
    assert q.absmax[3] == 0 and q.absmax[-1] == torch.tensor(1e-38)  # bitsandbytes clamps the tail's absmax


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    torch.manual_seed(3)
    x = torch.randn(40, 70).to(device_for(backend))  # the views are made where the kernel runs: .to() would copy them contiguous
    for view in (x.t(), x[:, ::3], x[::2].t()[5:]):
        assert not view.is_contiguous()
        check_against_bnb(view, 64, True, backend, out_dtypes=[torch.float32])


def test_triton_equals_reference_on_a_larger_tensor():
    torch.manual_seed(4)
    x = torch.randn(130, 257, dtype=torch.float16)
    a = quantize(x, 64, True, backend="torch")
    b = quantize(x, 64, True, backend="triton")
    for name in ("packed", "absmax", "offset", "nested_absmax"):
        assert same_bits(getattr(a, name), getattr(b, name)), name
    assert same_bits(dequantize(a, backend="torch"), dequantize(b, backend="triton"))


def test_reconstruction_error_equals_bitsandbytes():
    torch.manual_seed(5)
    x = torch.randn(64, 256) * 0.02
    for double_quant in (False, True):
        packed_ref, state_ref = bnb_quantize(x, 64, double_quant)
        err_ref = (bnb_dequantize(packed_ref, state_ref, torch.float32) - x).abs().mean()
        err = (dequantize(quantize(x, 64, double_quant, backend="triton"), backend="triton") - x).abs().mean()
        assert err == err_ref and err < 0.02 * 0.1  # about 8% of the weights' std: NF4 is coarse


@settings(max_examples=25, deadline=None, database=None, derandomize=True)  # the same 25 cases on every run
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    log2_blocksize=st.integers(5, 12),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1e-4, 0.02, 1.0, 300.0]),
    seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(BACKENDS),
)
def test_property_random_shapes_and_values(shape, log2_blocksize, double_quant, dtype, scale, seed, backend):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale * torch.rand(shape, generator=g) ** 3).to(dtype)
    check_against_bnb(x, 2**log2_blocksize, double_quant, backend, out_dtypes=[dtype])


def test_nf4_values_are_the_qlora_normal_quantiles():
    """The 16 values are derived, not trusted: QLoRA (Dettmers et al. 2023, arXiv:2305.14314, section 3 and
    bitsandbytes' create_normal_map) takes quantiles of N(0, 1) at probabilities evenly spaced from `offset` down
    to 1/2: 9 points for the positive side (the 1/2 end, the median 0, dropped: 8 values), 8 for the negative side
    (7 values), adds an exact zero and divides by the largest value. offset = 1 - (1/30 + 1/32) / 2: the mean of
    the last bin centres' probabilities with 15 and with 16 equal bins, written 0.9677083 by bitsandbytes.

    Equal to the table bit for bit when rounded at bitsandbytes' steps: the probabilities are float32 (its
    torch.linspace), the quantiles float64 (scipy's norm.ppf; torch.special.ndtri here), the values then float32,
    divided by their maximum in float32. Carried out entirely in float64 they land up to 6 float32 ulps away (the
    tails' quantiles are steep in the rounded probabilities), which is why the table is stored, not recomputed."""
    offset = 0.9677083
    assert abs(offset - (1 - (1 / 30 + 1 / 32) / 2)) < 1e-7

    def normal_map(float_dtype):
        positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=float_dtype)[:-1].double())  # (8,)
        negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=float_dtype)[:-1].double())  # (7,)
        values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).to(float_dtype).sort().values
        return (values / values.max()).float()

    table = torch.tensor(NF4_VALUES)
    assert same_bits(normal_map(torch.float32), table)
    ulps = (normal_map(torch.float64).view(torch.int32) - table.view(torch.int32)).abs()
    assert 0 < ulps.max() <= 6 and ulps[[0, 7, 15]].tolist() == [0, 0, 0]  # -1, 0 and 1 are exact either way


def test_bits_per_parameter():
    n = 1024 * 256
    for double_quant, expected in ((False, 4.5), (True, 4 + 8 / 64 + 32 / (64 * 256))):
        q = quantize_nf4(torch.randn(n // 64, 64), 64, double_quant, backend="torch")
        bits = 8 * sum(t.numel() * t.element_size() for t in (q.packed, q.absmax, q.offset, q.nested_absmax)
                       if t is not None)
        assert math.isclose(bits / n, expected + (32 / n if double_quant else 0))
    assert round(4 + 8 / 64 + 32 / (64 * 256), 3) == 4.127  # the QLoRA paper's figure


def test_bad_nf4_input_is_a_clear_error():
    x = torch.randn(8, 8)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(x.double())
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.ones(4, dtype=torch.int32))
    for bad in (16, 48, 8192, 64.0):
        with pytest.raises(ValueError, match="power of two from 32 to 4096"):
            quantize_nf4(x, blocksize=bad)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 4))
    for bad_value in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 3] = bad_value
        with pytest.raises(ValueError, match="NaN or inf"):
            quantize_nf4(y)
    with pytest.raises(ValueError, match="backend"):
        quantize_nf4(x, backend="gpu")
    q = quantize_nf4(x)
    with pytest.raises(ValueError, match="dtype must be"):
        dequantize_nf4(q, torch.int8)
    with pytest.raises(ValueError, match="packed must be uint8 with 32 bytes"):
        dequantize_nf4(NF4State(q.packed[:5], q.absmax, q.shape, q.dtype, 64))
    with pytest.raises(ValueError, match="absmax must be"):
        dequantize_nf4(NF4State(q.packed, q.absmax.half(), q.shape, q.dtype, 64))
