"""Optimizers: one table, OPTIMIZERS below, from the config's `optimizer` name to the class that implements it.

Each class carries its own facts, which the rest of nanoft asks for instead of restating them:

    from_config(groups, cfg)        the optimizer over these param groups, with the config's hyperparameters
    tensor_state_bytes(shape, elem, cfg)   exact bytes of state it keeps for one trainable tensor (the memory estimator)
    nominal_bytes_per_param         the same for a bare parameter count (None: it needs the shapes)
    paged                           whether its states live in host memory
    loss_tolerance                  how far `python -m nanoft check` lets its loss be from AdamW's

Two param groups, as nanoGPT: weight decay on tensors of 2 or more dimensions (matmul weights, embeddings),
none on biases and LayerNorm gains. The training loop sets `group["lr"]` of every group each step; Adafactor
with `adafactor_relative_step=True` ignores it and computes its own step size.
"""
from __future__ import annotations

import torch

from nanoft.config import ConfigError
from nanoft.optim.adafactor import Adafactor
from nanoft.optim.adamw import AdamW
from nanoft.optim.adamw8bit import AdamW8bit
from nanoft.optim.lion import Lion
from nanoft.optim.paged import PagedAdamW, PagedAdamW8bit
from nanoft.optim.schedule import warmup_cosine

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": AdamW,  # torch.optim.AdamW (fused on CUDA): 8 bytes of state per float32 parameter
    "adamw8bit": AdamW8bit,  # AdamW, states 8-bit block-wise: ~2.03 bytes
    "paged_adamw": PagedAdamW,  # AdamW, float32 states in host memory, paged to the device for each update
    "paged_adamw8bit": PagedAdamW8bit,  # AdamW8bit, states in host memory
    "adafactor": Adafactor,  # factored second moment: n + m values for an n x m matrix
    "lion": Lion,  # the sign of an interpolated momentum (Chen et al. 2023): 4 bytes
}

__all__ = ["OPTIMIZERS", "Adafactor", "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit",
           "make_optimizer", "optimizer_class", "param_groups", "warmup_cosine"]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The table's class for `name`; an unknown name is a one-line ConfigError listing the valid ones."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"config key 'optimizer' must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    return OPTIMIZERS[name]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into [decayed (dim >= 2), not decayed (dim < 2)]; empty groups dropped."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied weight once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer over the model's trainable parameters (see the module docstring)."""
    cls = optimizer_class(cfg.optimizer)
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad=True) to optimize")
    return cls.from_config(groups, cfg)
