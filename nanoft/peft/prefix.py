"""Prefix tuning: train P key/value pairs that every attention layer sees before the sequence; freeze the model.

Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", https://arxiv.org/abs/2101.00190.

Attention in layer l turns the sequence x_1..x_T into queries, keys and values and lets query t look at keys
1..t. Prefix tuning prepends P trained key/value pairs (K_l, V_l), each (P, C), to every layer's keys and values:

    attention_l(x)_t = softmax(q_t [K_l; k_1..k_T]ᵀ / √d, masked) [V_l; v_1..v_T]

The prefixes have no queries of their own (nothing is computed at their positions) and no position
embedding; every real query sees all P of them and, as before, its own past: the causal mask, (T, T) lower
triangular, widens to (T, P + T) with P columns of True in front. That is what nanoft.model.gpt's
CausalSelfAttention does when its `prefix` attribute is set: it calls it for this layer's (K_l, V_l),
concatenates, and hands SDPA the widened mask. Only the prefixes train: L · 2 · P · C numbers
(configs/prefix.py: 4 · 2 · 10 · 128 = 10,240), and the model itself is untouched.

Reparameterisation. Optimizing the prefixes directly is unstable and sensitive to the learning rate (the
paper's section 4.3), so during training they are the output of a small MLP over a trained embedding
E (P, C), one row per prefix position, shared by every layer:

    [K_1; V_1; ...; K_L; V_L] = W_2 tanh(W_1 E + b_1) + b_2        W_1: (H, C), W_2: (L · 2 · C, H)

E, W_1, b_1, W_2, b_2 train (configs/prefix.py, H = prefix_hidden = 128: 149,888 numbers); after training
only the product matters, so `fold` evaluates the MLP once and keeps the (K_l, V_l) as a `PrefixTable`.
A checkpoint's model tensors are that table alone (prefix.key and prefix.value, each (L, P, C)): what
sample.py loads. A run that may be resumed also needs E and the MLP, which are saved beside the optimizer
state as training state (Checkpoint.train_only), never loaded for inference.

The prefixes are extra attention positions, not a change to any weight, so they cannot be merged into the
base; sample.py applies them to it.

    model = apply_prefix(GPT(cfg), cfg, dtype, reparameterise=True)   # training
    table = fold(model.prefix)                                         # the (K_l, V_l), for saving
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoft.config import Config

WHY_NO_MERGE = "prefixes are extra attention positions, not a change to any weight of the base"


class PrefixEncoder(nn.Module):
    """Training-time source of the prefixes: layer l's (K_l, V_l) are rows of W_2 tanh(W_1 E + b_1) + b_2."""

    def __init__(self, n_layer: int, n_prefix: int, width: int, hidden: int, device=None):
        super().__init__()
        self.n_layer, self.n_prefix, self.width = n_layer, n_prefix, width
        # N(0, 1), as nn.Embedding (the paper's code) starts it; float32 master weights, as every trained tensor
        self.embedding = nn.Parameter(torch.randn(n_prefix, width, device=device))
        self.hidden = nn.Linear(width, hidden, device=device)
        self.out = nn.Linear(hidden, n_layer * 2 * width, device=device)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's (keys, values), each (P, C): only its 2C output rows of W_2 are computed."""
        h = torch.tanh(self.hidden(self.embedding))  # (P, H); cheap enough to recompute in every layer
        rows = slice(2 * self.width * i, 2 * self.width * (i + 1))
        kv = F.linear(h, self.out.weight[rows], self.out.bias[rows])  # (P, 2C)
        return kv[:, :self.width], kv[:, self.width:]


class PrefixTable(nn.Module):
    """The prefixes themselves, (L, P, C) keys and values: what a folded (saved, loaded) prefix holds."""

    def __init__(self, n_layer: int, n_prefix: int, width: int, device=None):
        super().__init__()
        self.n_layer, self.n_prefix, self.width = n_layer, n_prefix, width
        self.key = nn.Parameter(torch.zeros(n_layer, n_prefix, width, device=device))
        self.value = nn.Parameter(torch.zeros(n_layer, n_prefix, width, device=device))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return self.key[i], self.value[i]


class LayerPrefix:
    """What attention layer i calls for its (keys, values). A plain object, not a module: the source is
    registered once, as model.prefix, and every layer reads from it."""

    def __init__(self, source: PrefixEncoder | PrefixTable, i: int):
        self.source, self.i = source, i

    def __call__(self) -> tuple[Tensor, Tensor]:
        return self.source.layer(self.i)

    def __repr__(self) -> str:
        return f"LayerPrefix(layer {self.i} of {type(self.source).__name__})"


@torch.no_grad()
def fold(source: PrefixEncoder) -> PrefixTable:
    """The table of the prefixes `source` produces now (each layer computed as the encoder computes it
    during training, so the folded model's logits are the same bits)."""
    table = PrefixTable(source.n_layer, source.n_prefix, source.width, device=source.embedding.device)
    for i in range(source.n_layer):
        table.key[i], table.value[i] = source.layer(i)
    return table


def apply_prefix(model: nn.Module, cfg: Config, dtype: torch.dtype, reparameterise: bool = True) -> nn.Module:
    """Freeze the GPT and give every attention layer cfg.prefix_len trained key/value prefixes, read from
    model.prefix: a PrefixEncoder (the paper's MLP; for training) or, with reparameterise=False, a PrefixTable
    (the folded prefixes; for loading a saved run). Frozen weights are stored in `dtype` (the run's compute
    dtype: bf16 on CUDA); the prefix source keeps float32 master weights. In place; returns the model."""
    if getattr(model, "prefix", None) is not None:
        raise ValueError("the model already has prefixes; apply_prefix must be called once")
    model.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    device = model.wte.weight.device
    n_layer, width = len(model.blocks), model.wte.weight.shape[1]
    model.prefix = (PrefixEncoder(n_layer, cfg.prefix_len, width, cfg.prefix_hidden, device) if reparameterise
                    else PrefixTable(n_layer, cfg.prefix_len, width, device))
    for i, block in enumerate(model.blocks):
        block.attn.prefix = LayerPrefix(model.prefix, i)
    return model


def folded_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a prefix run saves as its model: {"prefix.key", "prefix.value"}, each (L, P, C)."""
    table = model.prefix if isinstance(model.prefix, PrefixTable) else fold(model.prefix)
    return {f"prefix.{name}": t.detach() for name, t in table.state_dict().items()}
