"""NF4 weights for QLoRA: a quantized tensor type and a frozen 4-bit linear layer.

    y = x @ dequant(W_nf4).T + b          computed in `compute_dtype`; W_nf4 never changes

`NF4Tensor` holds one weight in the format of `nanoft.kernels.nf4` (bit-identical to bitsandbytes'
`quantize_4bit(..., quant_type="nf4")`): packed 4-bit codes plus per-block absmax, optionally double
quantized (QLoRA, arXiv:2305.14314, section 3). It moves between devices, reports its size, and converts to
and from a flat dict of tensors.

`Linear4bit` is the frozen layer. Its `weight` is an `NF4Tensor`, not a Parameter, so optimizers never see
it; the bias stays a float Parameter with requires_grad=False. The backward pass gives the input its
gradient by dequantizing W again (as bitsandbytes' MatMul4Bit does) rather than keeping the float weight
alive between forward and backward: the saved memory is the point of QLoRA.

State-dict keys (bitsandbytes `Linear4bit` / `QuantState.as_dict(packed=True)`, so checkpoints interoperate):

    weight                                  uint8 [ceil(out*in/2), 1]   packed codes, even element high
    weight.absmax                           float32 [num_blocks]; uint8 [num_blocks] if double quantized
    weight.quant_map                        float32 [16]               the NF4 values
    weight.nested_absmax                    float32 [ceil(num_blocks/256)]   (double quantization only)
    weight.nested_quant_map                 float32 [256]              the signed dynamic map (idem)
    weight.quant_state.bitsandbytes__nf4    uint8 [k]                  UTF-8 JSON: quant_type, blocksize,
                                                                       dtype, shape, nested_blocksize,
                                                                       nested_dtype, nested_offset
    bias                                    float [out]

All are plain tensors (no shared storage), so `safetensors.torch.save_file(layer.state_dict(), path)` works.
"""
import json
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoft.kernels import NF4State, dequantize_nf4, dynamic_map, quantize_nf4
from nanoft.kernels.nf4 import NESTED_BLOCKSIZE, NF4_VALUES

_QS_KEY = "quant_state.bitsandbytes__nf4"


class NF4Tensor:
    """A frozen tensor stored as NF4 (4-bit codes + absmax per block of `blocksize`)."""

    def __init__(self, state: NF4State):
        self.state = state

    @classmethod
    def from_float(cls, w: Tensor, blocksize: int = 64, double_quant: bool = True, backend: str = "auto"):
        return cls(quantize_nf4(w.detach(), blocksize=blocksize, double_quant=double_quant, backend=backend))

    def dequantize(self, dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
        return dequantize_nf4(self.state, dtype, backend=backend)

    shape = property(lambda self: self.state.shape)
    dtype = property(lambda self: self.state.dtype)  # of the tensor that was quantized
    device = property(lambda self: self.state.device)
    blocksize = property(lambda self: self.state.blocksize)
    double_quant = property(lambda self: self.state.double_quant)

    def numel(self) -> int:
        return self.state.numel

    def to(self, device) -> "NF4Tensor":
        return NF4Tensor(self.state.to(device))

    @property
    def nbytes(self) -> int:
        """Bytes stored per tensor: codes, absmax, nested absmax and offset (not the shared code tables)."""
        s = self.state
        return sum(t.numel() * t.element_size() for t in (s.packed, s.absmax, s.offset, s.nested_absmax)
                   if t is not None)

    @property
    def bits_per_param(self) -> float:
        """4.5 at blocksize 64 without double quantization; 4 + 8/64 + 32/(64*256) ~= 4.127 with it."""
        return 8 * self.nbytes / self.numel()

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device}, bits/param={self.bits_per_param:.3f})")

    # ------------------------------------------------------------------------------------------------------
    # Flat dicts of tensors, with bitsandbytes' key names

    def to_state_dict(self, key: str) -> dict[str, Tensor]:
        """{key: packed, key + ".absmax": ..., ...}: see the module docstring."""
        s = self.state
        meta = {"quant_type": "nf4", "blocksize": s.blocksize, "dtype": str(s.dtype).removeprefix("torch."),
                "shape": list(s.shape)}
        out = {key: s.packed.view(-1, 1), f"{key}.absmax": s.absmax,
               f"{key}.quant_map": torch.tensor(NF4_VALUES, dtype=torch.float32, device=s.device)}
        if s.double_quant:
            out[f"{key}.nested_absmax"] = s.nested_absmax
            out[f"{key}.nested_quant_map"] = dynamic_map(True).to(s.device)
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=s.offset.item())
        json_bytes = json.dumps(meta).encode("utf-8")
        out[f"{key}.{_QS_KEY}"] = torch.tensor(list(json_bytes), dtype=torch.uint8, device=s.device)
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], key: str) -> "NF4Tensor":
        """Inverse of to_state_dict; also reads what bitsandbytes' Linear4bit saves for an nf4 weight."""
        if f"{key}.{_QS_KEY}" not in sd:
            raise ValueError(f"{key}: no '{key}.{_QS_KEY}' entry: not an NF4 weight (fp4 is not supported)")
        meta = json.loads(bytes(sd[f"{key}.{_QS_KEY}"].cpu().tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{key}: quant_type {meta.get('quant_type')!r}, only nf4 is supported")
        packed, absmax = sd[key], sd[f"{key}.absmax"]
        for name, want in ((f"{key}.quant_map", torch.tensor(NF4_VALUES)),
                           (f"{key}.nested_quant_map", dynamic_map(True))):
            if name in sd and not torch.equal(sd[name].float().cpu(), want):
                raise ValueError(f"{name} is not the standard table; only standard NF4 (nested: dynamic) maps load")
        offset = nested = None
        if "nested_offset" in meta:
            if meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
                raise ValueError(f"{key}: nested_blocksize {meta.get('nested_blocksize')}, expected 256")
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
            nested = sd[f"{key}.nested_absmax"].float()
        state = NF4State(packed=packed.reshape(-1).contiguous(), absmax=absmax.reshape(-1).contiguous(),
                         shape=torch.Size(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                         blocksize=int(meta["blocksize"]), offset=offset, nested_absmax=nested)
        return cls(state)


class _NF4Linear(torch.autograd.Function):
    """x @ dequant(W).T, whose backward re-dequantizes W instead of saving it (W itself gets no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: NF4Tensor) -> Tensor:
        ctx.weight = weight  # a Python object: autograd keeps no float copy of W alive
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w = ctx.weight.dequantize(grad_out.dtype)  # (out, in): a second dequantize, freed right after
        return grad_out @ w, None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        # a placeholder weight (all codes and scales zero) until from_linear or load_state_dict fills it
        self.weight = NF4Tensor(_empty_state((out_features, in_features), blocksize, double_quant, device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32, backend: str = "auto") -> "Linear4bit":
        """Quantize an nn.Linear's weight (on its device); the bias is copied as it is."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant,
                    compute_dtype, device=linear.weight.device)
        layer.weight = NF4Tensor.from_float(linear.weight, blocksize, double_quant, backend)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def hold_as_parameters(self) -> None:
        """For FSDP2 (nanoft.run.distributed.place): hold the NF4 storage as frozen parameters, so that fully_shard
        splits it like any other weight: `nf4_packed` (uint8 codes), `nf4_absmax` (uint8 or float32 scales) and,
        double quantized, `nf4_nested_absmax` (float32), all 1-D. Each rank then keeps 1/N of the codes and of
        their scales; the all-gather before forward (and again before backward) makes them whole, and forward
        rebuilds the NF4 weight from them (`nf4_weight`). The scalar offset is a few bytes: every rank keeps it."""
        s = self.weight.state
        self.nf4_packed = nn.Parameter(s.packed, requires_grad=False)
        self.nf4_absmax = nn.Parameter(s.absmax, requires_grad=False)
        if s.double_quant:
            self.nf4_nested_absmax = nn.Parameter(s.nested_absmax, requires_grad=False)

    def nf4_weight(self) -> NF4Tensor:
        """The NF4 weight, rebuilt from the held parameters (whole inside an FSDP2 forward) if it is held so."""
        if not hasattr(self, "nf4_packed"):
            return self.weight
        nested = getattr(self, "nf4_nested_absmax", None)
        return NF4Tensor(replace(self.weight.state, packed=self.nf4_packed, absmax=self.nf4_absmax,
                                 nested_absmax=nested))

    def forward(self, x: Tensor) -> Tensor:
        out = _NF4Linear.apply(x.to(self.compute_dtype), self.nf4_weight())  # (..., out_features)
        if self.bias is not None:  # in the matmul's dtype (bf16 under autocast), as nn.Linear's bias would be:
            out = out + self.bias.to(out.dtype)  # a float32 bias would promote every output to float32
        if torch.is_autocast_enabled(x.device.type):
            return out  # as nn.Linear under autocast: the compute dtype, no round trip through x's dtype
        return out.to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight (out, in), in `dtype` (default: the compute dtype)."""
        return self.nf4_weight().dequantize(dtype or self.compute_dtype)

    @property
    def bits_per_param(self) -> float:
        return self.weight.bits_per_param

    def _apply(self, fn, recurse=True):
        """Module.to/cuda/cpu/half: move the NF4 weight's tensors to the new device, never change their dtype."""
        super()._apply(fn, recurse)
        device = fn(self.weight.state.packed).device  # uint8: fn only ever changes its device
        self.weight = self.weight.to(device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias (and the held nf4_* shards, if held)
        if not hasattr(self, "nf4_packed"):
            destination.update(self.weight.to_state_dict(prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        if key not in mine:
            missing_keys.append(key)
        else:
            try:
                weight = NF4Tensor.from_state_dict(mine, key)
                if tuple(weight.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
                self.weight = weight.to(self.weight.device)
            except (ValueError, KeyError) as e:
                error_msgs.append(f"while loading {key}: {e}")
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.weight.blocksize}, double_quant={self.weight.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


def _empty_state(shape, blocksize: int, double_quant: bool, device) -> NF4State:
    n = math.prod(shape)
    num_blocks = -(-n // blocksize)
    zeros = lambda count, dtype: torch.zeros(count, dtype=dtype, device=device)
    if not double_quant:
        return NF4State(zeros(-(-n // 2), torch.uint8), zeros(num_blocks, torch.float32), torch.Size(shape),
                        torch.float32, blocksize)
    return NF4State(zeros(-(-n // 2), torch.uint8), zeros(num_blocks, torch.uint8), torch.Size(shape),
                    torch.float32, blocksize, offset=torch.zeros((), device=device),
                    nested_absmax=zeros(-(-num_blocks // NESTED_BLOCKSIZE), torch.float32))
