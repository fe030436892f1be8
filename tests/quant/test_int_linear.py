"""INT8 / INT4 layers (nanoft/quant/int_linear.py): the grid against its formula in float64, the fast paths (torch's
weight-only kernels) against the plain dequantize + matmul reference and against nn.Linear, the packed layout,
and a round trip through safetensors into an empty layer built from the FORMATS table."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoft.quant import FORMATS, Int4Linear, Int8Linear
from nanoft.quant.int_linear import pack_int4, rtn, unpack_int4


def linear(n_in=256, out=96, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, out, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(out, 1) * 4)  # rows of unequal range, as trained layers have
    return layer


def test_int8_rounds_symmetrically_per_channel_as_written():
    lin = linear()
    w = lin.weight.detach().double()
    s = w.abs().amax(dim=1, keepdim=True) / 127  # the formula, float64
    expect = (torch.clamp(torch.round(w / s), -127, 127) * s)
    layer = Int8Linear.from_linear(lin)
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() == 127
    torch.testing.assert_close(layer.dequantize(torch.float64), expect, rtol=1e-6, atol=1e-7)
    assert (layer.dequantize() - lin.weight).abs().max() <= s.max() / 2 + 1e-6


def test_int4_rounds_each_group_asymmetrically_as_written():
    lin = linear()
    g = 32
    w = lin.weight.detach().double().view(96, -1, g)  # (out, groups, g)
    lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    expect = (s * (torch.clamp(torch.round(w / s) + z, 0, 15) - z)).view(96, -1)
    layer = Int4Linear.from_linear(lin, group_size=g)
    assert layer.qweight.shape == (96, 128) and layer.scales.shape == layer.zeros.shape == (96, 8)
    torch.testing.assert_close(layer.dequantize(torch.float64), expect, rtol=1e-6, atol=1e-7)


def test_two_int4_codes_a_byte_low_nibble_first():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and packed[0, 0] == codes[0, 0] + 16 * codes[0, 1]
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("make", [Int8Linear.from_linear, lambda lin: Int4Linear.from_linear(lin, 64),
                                  lambda lin: Int4Linear.from_linear(lin, 32)], ids=["int8", "int4-g64", "int4-g32"])
def test_the_fast_path_matches_the_reference_and_nn_linear_on_the_dequantized_weight(make):
    lin = linear()
    layer = make(lin)
    x = torch.randn(3, 7, 256)
    ref = layer.forward_reference(x)
    plain = nn.functional.linear(x, layer.dequantize(), lin.bias)  # nn.Linear holding the dequantized weight
    torch.testing.assert_close(ref, plain, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)  # float32: the reference is the faster path
    with torch.autocast("cpu", torch.bfloat16):  # torch's kernel; as nn.Linear under autocast: bf16 out
        fast, ref_bf16 = layer(x), layer.forward_reference(x)
    assert fast.shape == (3, 7, 96) and fast.dtype == ref_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref_bf16.float(), rtol=0.02, atol=0.05)  # both bf16-rounded
    torch.testing.assert_close(layer(x.bfloat16()).float(), fast.float(), rtol=0, atol=0)  # bf16 in: the same
    # against the plain-float answer: within bf16's rounding of inputs and outputs (8 bits of mantissa)
    assert ((fast.float() - ref).abs().max() / ref.abs().max()) < 0.02


def test_a_group_size_torch_has_no_kernel_for_uses_the_reference():
    lin = linear(n_in=48, out=16)
    layer = Int4Linear.from_linear(lin, group_size=16)
    x = torch.randn(2, 48).bfloat16()
    torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt, params", [("int8", {}), ("int4", {"group_size": 64}),
                                         ("nf4", {"blocksize": 64, "double_quant": True})])
def test_a_quantized_layer_round_trips_through_safetensors_into_an_empty_one(fmt, params, tmp_path):
    lin = linear()
    cls = FORMATS[fmt]
    layer = cls.from_linear(lin, **params) if fmt != "int8" else cls.from_linear(lin)
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "w.safetensors")
    empty = cls(256, 96, True, **params)
    empty.load_state_dict(load_file(tmp_path / "w.safetensors"))
    x = torch.randn(4, 256)
    torch.testing.assert_close(empty(x), layer(x), rtol=0, atol=0)


def test_int4_refuses_a_group_size_that_does_not_divide_the_input():
    with pytest.raises(ValueError, match="in_features=100 must be a multiple of group_size=64"):
        Int4Linear(100, 8, group_size=64)


def test_rtn_codes_stay_on_the_grid():
    w = linear().weight.detach()
    codes, scale, zero = rtn(w, 4, 64, sym=False)
    assert codes.min() >= 0 and codes.max() <= 15 and zero.min() >= 0 and zero.max() <= 15
    assert codes.eq(codes.round()).all() and (scale > 0).all()
