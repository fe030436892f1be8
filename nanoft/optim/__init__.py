"""Optimizers: the config's `optimizer` name -> a torch.optim.Optimizer over the model's trainable parameters.

    adamw            torch.optim.AdamW (fused on CUDA)                       8 bytes of state per parameter
    adamw8bit        AdamW, states 8-bit block-wise (adamw8bit.py)          ~2.03 bytes
    paged_adamw      AdamW, float32 states in host memory (paged.py)         8 bytes, on the device only for
    paged_adamw8bit  AdamW8bit, states in host memory (paged.py)            ~2.03 bytes, tensors < 4096 elements
    adafactor        Adafactor, factored second moment (adafactor.py)       n + m values for an n x m matrix

Two param groups, as nanoGPT: weight decay on tensors of 2 or more dimensions (matmul weights, embeddings),
none on biases and LayerNorm gains. The training loop sets `group["lr"]` of every group each step; Adafactor
with `adafactor_relative_step=True` ignores it and computes its own step size.
"""
from __future__ import annotations

import torch

from nanoft.config import CHOICES
from nanoft.optim.adafactor import Adafactor
from nanoft.optim.adamw8bit import AdamW8bit
from nanoft.optim.paged import PagedAdamW, PagedAdamW8bit

# the names make_optimizer builds: listed once, in the config's CHOICES (config.py stays torch-free to import)
OPTIMIZERS = CHOICES["optimizer"]

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "Adafactor", "make_optimizer", "param_groups", "OPTIMIZERS"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into [decayed (dim >= 2), not decayed (dim < 2)]; empty groups dropped."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied weight once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer, with cfg's lr, betas, eps and weight decay (see the module doc)."""
    name = cfg.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad=True) to optimize")
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if name == "adamw":
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, **adam, fused=True if on_cuda else None)
    if name == "adamw8bit":
        return AdamW8bit(groups, **adam, min_8bit_size=cfg.min_8bit_size)
    if name == "paged_adamw":
        return PagedAdamW(groups, **adam, page_size=cfg.page_size)
    if name == "paged_adamw8bit":
        return PagedAdamW8bit(groups, **adam, min_8bit_size=cfg.min_8bit_size, page_size=cfg.page_size)
    # adafactor: with relative steps lr must be None (transformers' documented Adafactor(lr=None, relative_step=True) setting); betas and eps are Adam's, not used
    return Adafactor(groups, lr=None if cfg.adafactor_relative_step else cfg.lr,
                     relative_step=cfg.adafactor_relative_step, scale_parameter=cfg.adafactor_scale_parameter,
                     warmup_init=cfg.adafactor_warmup_init)
