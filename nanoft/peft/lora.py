"""LoRA and QLoRA: train a few low-rank matrices beside a frozen model instead of the model itself.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) keeps a pretrained linear layer W0 frozen and
learns a low-rank update beside it:

    x -> W0 x + b + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r), r << min(in, out)

Only A and B are trained: r * (in + out) numbers instead of in * out. B starts at zero, so at
initialisation the wrapped layer computes exactly what the base layer did, and fine-tuning starts from
the pretrained model rather than from a perturbed one. alpha / r scales the update so that changing r
does not force re-tuning the learning rate. Merging folds the update into the weight,
W = W0 + (alpha / r) B A, so inference costs one matmul again.

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) additionally stores the frozen W0 as
4-bit NormalFloat with double-quantized block scales (`nanoft.quant.nf4.Linear4bit`), dequantized on the fly
in the compute dtype.

Precision, as peft and litgpt do it: everything frozen (embeddings, the frozen linears, frozen norms) is
stored in the compute dtype (bfloat16 on CUDA: half the bytes of float32; float32 on CPU), while what
trains (the adapters, and norms under lora_train_norms) keeps float32 master weights. Under bf16 autocast
the matmuls still run in bf16, but the optimizer adds its small late updates to float32 numbers, where a
bf16 weight would round them away (bf16 keeps 8 significant bits: 1 + 1e-3 == 1).

This file is the layer alone. Putting it into a GPT, saving and loading adapters and merging a whole model:
nanoft/peft/lora_model.py. Merging a run's checkpoint into a full one: `python -m nanoft merge` (nanoft/tools/merge.py).

    lora = LoRALinear(nn.Linear(64, 64), r=4, alpha=8)   # lora(x) == base(x) until B trains
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoft.quant.nf4 import Linear4bit


def float_weight(base: nn.Module) -> Tensor:
    """The base layer's weight as a float tensor: the parameter itself, or the NF4 weight dequantized."""
    if isinstance(base, nn.Linear):
        return base.weight
    return base.dequantize()


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: x -> W0 x + b + (alpha / r) B A dropout(x).

    base: an nn.Linear or a nanoft.quant.nf4.Linear4bit; it is frozen here (requires_grad False).
    Init: (1) A ~ Kaiming-uniform(a=sqrt(5)), as nn.Linear initialises its weight, so the A x features
    start at a sensible scale; (2) B = 0, so the update B A is zero and the output equals the base's.
    The adapters live on the base's device, in float32 (master weights; see the module docstring).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {r}")
        if not isinstance(base, (nn.Linear, Linear4bit)):
            raise TypeError(f"LoRALinear wraps nn.Linear or Linear4bit, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device  # for an NF4 base, base.weight holds the packed codes
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=torch.float32))
        self.merged = False
        self._quantized_base: nn.Module | None = None  # the NF4 base, put aside while merged
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # step 1: A random
        nn.init.zeros_(self.lora_B)  # step 2: B zero, so B A = 0 and the layer starts as the base

    def adapter_params(self) -> list[str]:
        """Names of the trainable adapter parameters of this module (torchtune's convention)."""
        return ["lora_A", "lora_B"]

    def delta_weight(self) -> Tensor:
        """(alpha / r) B A: the (out, in) matrix the adapter adds to W0."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)  # (..., out)
        if self.merged:  # the update already sits inside the base weight
            return out
        d = self.dropout(x)
        if not torch.is_autocast_enabled(d.device.type):  # under autocast F.linear casts both sides itself
            d = d.to(self.lora_A.dtype)
        h = F.linear(d, self.lora_A)  # (..., r): the narrow bottleneck
        return out + self.scaling * F.linear(h, self.lora_B).to(out.dtype)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight so inference costs one matmul: W = W0 + (alpha/r) B A.

        For an nn.Linear base the weight is changed in place. A 4-bit weight cannot hold W0 + BA without
        re-quantizing (which would lose the update in rounding), so for a Linear4bit base merging means
        dequantize + add: the base becomes a float nn.Linear (in the compute dtype) and the NF4 layer is
        kept aside, so that unmerge() restores it bit for bit. Adapters get no gradient while merged."""
        if self.merged:
            return
        if isinstance(self.base, nn.Linear):
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        else:
            self._quantized_base = self.base
            self.base = plain_linear(self.base, float_weight(self.base) + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): subtract the update again (float base; exact up to rounding) or put the NF4 base back."""
        if not self.merged:
            return
        if self._quantized_base is not None:
            self.base, self._quantized_base = self._quantized_base, None
        else:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def plain_linear(like: nn.Module, weight: Tensor) -> nn.Linear:
    """A frozen nn.Linear with `weight` and the bias of `like` (what a merged layer becomes)."""
    bias = getattr(like, "bias", None)
    linear = nn.Linear(like.in_features, like.out_features, bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias.to(weight.dtype))
    linear.requires_grad_(False)
    return linear
