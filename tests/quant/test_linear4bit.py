"""nanoft.quant.nf4: the NF4 tensor and the frozen Linear4bit, against bitsandbytes' Linear4bit on CPU."""
import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from helpers import device_for
from safetensors.torch import load_file, save_file
from torch import nn

from nanoft.kernels import dequantize_nf4, quantize_nf4
from nanoft.quant.nf4 import Linear4bit, NF4Tensor


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    """bitsandbytes torch.compiles a fallback dequantize; compiling costs seconds and changes nothing."""
    with torch._dynamo.config.patch(disable=True):
        yield


def make_linear(i=128, o=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias)


def bnb_from_state_dict(sd: dict, i: int, o: int) -> nn.Module:
    """A bitsandbytes Linear4bit built from a (nanoft) state dict, the way transformers loads one."""
    layer = bnb.nn.Linear4bit(i, o, bias="bias" in sd, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    if "bias" in sd:
        layer.bias = nn.Parameter(sd["bias"], requires_grad=False)
    return layer


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_linear_is_frozen_and_computes_x_dequant_wt(double_quant):
    lin = make_linear()
    q = Linear4bit.from_linear(lin, blocksize=64, double_quant=double_quant, compute_dtype=torch.float32)
    assert isinstance(q.weight, NF4Tensor) and not isinstance(q.weight, nn.Parameter)
    assert [name for name, _ in q.named_parameters()] == ["bias"] and not q.bias.requires_grad
    assert torch.equal(q.bias, lin.bias)
    w = q.dequantize()
    assert w.shape == (48, 128) and w.dtype == torch.float32
    assert torch.equal(w, dequantize_nf4(quantize_nf4(lin.weight.detach(), 64, double_quant)))
    x = torch.randn(2, 5, 128)
    assert torch.equal(q(x), F.linear(x, w, lin.bias))
    assert (q(x) - lin(x)).abs().max() < 0.2  # NF4 error, small against outputs of size ~1


def test_compute_dtype_and_input_gradient():
    lin = make_linear(bias=False)
    q = Linear4bit.from_linear(lin, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.float32  # returned in the input's dtype, computed in bf16
    w = q.dequantize()
    assert w.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.to(torch.bfloat16), w).float())
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2.to(torch.bfloat16), w).float().backward(g)
    assert torch.equal(x.grad, x2.grad)  # recomputed dequantize in backward == autograd through F.linear


def test_same_state_dict_and_output_as_bitsandbytes():
    lin = make_linear()
    ours = Linear4bit.from_linear(lin, blocksize=64, double_quant=True)
    theirs = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes when the weight is moved
    sd, sd_ref = ours.state_dict(), theirs.state_dict()
    assert sorted(sd) == sorted(sd_ref)
    for key in sd:  # packed codes, absmax, nested absmax, maps and the JSON quant state: byte for byte
        assert sd[key].dtype == sd_ref[key].dtype and torch.equal(sd[key], sd_ref[key]), key
    x = torch.randn(3, 128)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("double_quant", [False, True])
def test_interop_both_directions(double_quant):
    lin = make_linear(seed=1)
    x = torch.randn(3, 128)
    ours = Linear4bit.from_linear(lin, blocksize=64, double_quant=double_quant)
    assert torch.equal(bnb_from_state_dict(ours.state_dict(), 128, 48)(x), ours(x))  # bitsandbytes reads ours
    theirs = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.float32, quant_type="nf4",
                               compress_statistics=double_quant)
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu")
    loaded = Linear4bit(128, 48, blocksize=64, double_quant=double_quant)
    loaded.load_state_dict(theirs.state_dict())  # we read bitsandbytes'
    assert torch.equal(loaded(x), theirs(x))


def test_safetensors_round_trip(tmp_path):
    model = nn.Sequential(Linear4bit.from_linear(make_linear(), 64, True), nn.GELU(),
                          Linear4bit.from_linear(make_linear(48, 16, seed=2), 32, False))
    path = tmp_path / "q.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = nn.Sequential(Linear4bit(128, 48), nn.GELU(), Linear4bit(48, 16, blocksize=32, double_quant=False))
    fresh.load_state_dict(load_file(str(path)))  # strict: no missing or unexpected keys
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), model(x))
    assert fresh[0].weight.double_quant and fresh[2].weight.blocksize == 32


def test_load_errors_are_clear():
    q = Linear4bit.from_linear(make_linear(), 64, True)
    with pytest.raises(RuntimeError, match=r"shape \(48, 128\), expected \(128, 48\)"):
        Linear4bit(48, 128).load_state_dict(q.state_dict())
    sd = q.state_dict()
    del sd["weight"]
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        Linear4bit(128, 48).load_state_dict(sd)


def test_device_moves_keep_the_quant_state():
    q = Linear4bit.from_linear(make_linear(), 64, True)
    before = q.dequantize()
    q = q.half().to("cpu")  # floating-point casts touch the bias only; the NF4 state keeps its dtypes
    assert q.bias.dtype == torch.float16
    assert q.weight.state.absmax.dtype == torch.uint8 and q.weight.state.nested_absmax.dtype == torch.float32
    assert torch.equal(q.dequantize(), before)
    if torch.cuda.is_available():
        qc = q.to("cuda")
        assert qc.weight.device.type == "cuda"
        assert torch.equal(qc.dequantize().cpu(), before)  # the Triton kernel on CUDA, the reference here


def test_triton_backend_quantizes_the_same():
    lin = make_linear(64, 40)
    a = NF4Tensor.from_float(lin.weight, 64, True, backend="torch")
    b = NF4Tensor.from_float(lin.weight.to(device_for("triton")), 64, True, backend="triton")  # compiled on CUDA
    assert torch.equal(a.dequantize(backend="torch"), b.dequantize(backend="triton").cpu())


def test_bits_per_parameter():
    assert Linear4bit(4096, 4096, double_quant=False).bits_per_param == 4.5
    bits = Linear4bit(4096, 4096, double_quant=True).bits_per_param
    assert bits == 4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2  # codes + 8-bit absmax + nested absmax + offset
    assert round(bits, 3) == 4.127  # the QLoRA paper's figure
    assert Linear4bit.from_linear(make_linear(), 64, True).bits_per_param == pytest.approx(4.135, abs=1e-3)
