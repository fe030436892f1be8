"""Houlsby adapters: small bottleneck networks inserted into a frozen model; only they (and the norms) train.
(nanoft/peft/lora_model.py is another thing: it puts LoRA into a model and reads and writes adapter files.)

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP", https://arxiv.org/abs/1902.00751.

Each block has two sublayers, attention and the MLP, and each ends in a projection back to the residual
width C (out_proj, fc_out). The paper inserts an adapter after each of those projections, before the residual
add. An adapter is a bottleneck with its own skip connection:

    A(h) = h + W_up act(W_down h + b_down) + b_up          W_down: (m, C), W_up: (C, m), m = adapter_size << C

so a block computes  x = x + A_attn(attn(ln_1(x)))  and then  x = x + A_mlp(mlp(ln_2(x))).
Each adapter adds 2mC + m + C parameters; configs/adapter.py (C = 128, m = 16, 4 blocks): 8 adapters,
33,920 numbers, plus the LayerNorms, which the paper trains as well (its Figure 2: "the adapter, the layer
normalization parameters"): 2C numbers each.

Init. The paper starts each adapter near the identity (small random weights). Here W_up and b_up start at
exactly zero, so A(h) = h and the adapted model computes what its base did, bit for bit, as LoRA's B = 0
does: fine-tuning starts from the pretrained function, not from a perturbed one. W_down is random
(nn.Linear's init), so W_up's gradient, δ · act(W_down h)ᵀ, is not zero at the first step, and W_down's
follows once W_up has moved.

An adapter is a nonlinear layer of its own: no weight of the base can absorb it, so, unlike LoRA, it cannot
be merged; sample.py applies it to its base.

    model = apply_adapters(GPT(cfg), cfg)     # cfg.finetune == "adapter", cfg.adapter_size == m
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoft.config import Config

# the projections each block's sublayers end in, by path inside the block: each gets an adapter after it
ADAPTED = ("attn.out_proj", "mlp.fc_out")
WHY_NO_MERGE = "an adapter is a nonlinear layer of its own (h + W_up gelu(W_down h)): no base weight can absorb it"


class Adapter(nn.Module):
    """h (..., C) -> h + up(gelu(down(h))): a bottleneck of width `size` with a skip connection. `up` starts
    at zero, so the adapter starts as the identity. float32 master weights on `device`."""

    def __init__(self, width: int, size: int, device: torch.device | str | None = None):
        super().__init__()
        self.down = nn.Linear(width, size, device=device, dtype=torch.float32)  # random: nn.Linear's init
        self.up = nn.Linear(size, width, device=device, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)  # A(h) = h + 0 at init: the model is its base
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        x = h if torch.is_autocast_enabled(h.device.type) else h.to(self.down.weight.dtype)  # autocast casts itself
        # GELU as the model's own MLP uses (tanh form); the paper leaves the nonlinearity open
        return h + self.up(F.gelu(self.down(x), approximate="tanh")).to(h.dtype)


class AdaptedLinear(nn.Module):
    """A frozen projection followed by its adapter: x -> A(base(x)). The base keeps its name inside
    (`out_proj.base.weight`), as LoRALinear's does."""

    def __init__(self, base: nn.Linear, size: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.adapter = Adapter(base.out_features, size, device=base.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.base(x))


def apply_adapters(model: nn.Module, cfg: Config, dtype: torch.dtype) -> nn.Module:
    """Freeze the GPT, put an adapter of width cfg.adapter_size after each block's attention and MLP output
    projections, and let the LayerNorms train too (the paper does). Frozen weights are stored in `dtype` (the
    run's compute dtype: bf16 on CUDA); adapters and norms keep float32 master weights. In place; returns it."""
    if any(isinstance(m, Adapter) for m in model.modules()):
        raise ValueError("the model already has adapters; apply_adapters must be called once")
    model.requires_grad_(False)
    for block in model.blocks:
        for path in ADAPTED:
            parent, name = path.split(".")
            sublayer = block.get_submodule(parent)
            setattr(sublayer, name, AdaptedLinear(getattr(sublayer, name), cfg.adapter_size))
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.requires_grad_(True)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
    return model
