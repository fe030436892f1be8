"""Parameter-efficient fine-tuning: install the method cfg.finetune names, save what it trained, load it back.

    lora, qlora  low-rank updates beside frozen (qlora: NF4) linear layers    nanoft/peft/lora.py, nanoft/peft/lora_model.py
    prefix       trained key/value prefixes in every attention layer          nanoft/peft/prefix.py
    adapter      bottleneck layers after each block's attention and MLP      nanoft/peft/houlsby.py

Each one freezes the base model, stores its frozen weights in the run's compute dtype (bf16 on CUDA) and adds
a few tensors that train in float32. The protocol they share, which train.py, sample.py and the benchmarks use:

    if peft_method(cfg):                                  # "lora", "qlora", "prefix", "adapter"; "" trains every weight
        model = apply_method(model, cfg, device)          # the surgery
        print(trainable_summary(model))                   # configs/adapter.py: trainable params: 36,224 of 7,274,368 (0.50%)
    weights, train_only = saved_tensors(model, cfg)        # what a checkpoint holds: only what the method trained
    load_trained(model, cfg, weights, train_only)          # strict: a missing, extra or misshapen tensor is an error
    extra["adapter"] = method_config(cfg, base_from)       # the method, its shape, and its base by content

`weights` is what runs the model (for prefix tuning the folded prefixes); `train_only` is what only a resumed
run needs beside them (for prefix tuning the MLP that produces the prefixes while training; empty otherwise).
sample.py rebuilds the base, applies the method with for_training=False and loads `weights`.
Merging into the base's weights is defined for LoRA only (python -m nanoft merge); `cannot_merge` says why not
for the others.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from nanoft.peft.lora_model import adapter_config, adapter_state_dict, apply_lora, compute_dtype, copy_exactly, load_adapter_state_dict
from nanoft.peft.lora_model import trainable_summary  # noqa: F401 (part of this protocol: train.py prints it)
from nanoft.config import Config
from nanoft.peft.houlsby import WHY_NO_MERGE as ADAPTER_NO_MERGE, apply_adapters
from nanoft.peft.prefix import WHY_NO_MERGE as PREFIX_NO_MERGE, PrefixEncoder, apply_prefix, folded_state_dict
from nanoft.run.adapter_base import base_identity



def peft_method(cfg: Config) -> str:
    """The parameter-efficient method a run trains: "lora" or "qlora" (finetune=lora/qlora, or DPO training LoRA
    weights: cfg.lora_kind), "prefix", "adapter"; "" when every weight trains (pretraining, full, ...)."""
    return cfg.lora_kind or (cfg.finetune if cfg.finetune in ("prefix", "adapter") else "")


def apply_method(model: nn.Module, cfg: Config, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, for_training: bool = True) -> nn.Module:
    """The surgery for cfg.finetune, in place. dtype: what the frozen weights are stored in (default: the run's
    compute dtype). for_training=False gives prefix tuning its folded table instead of the MLP."""
    dtype, method = dtype or compute_dtype(cfg), peft_method(cfg)
    if method in ("lora", "qlora"):
        return apply_lora(model, cfg, device, dtype)  # QLoRA quantizes each layer on the device
    model = model.to(device) if device is not None else model
    if method == "prefix":
        return apply_prefix(model, cfg, dtype, reparameterise=for_training)
    if method == "adapter":
        return apply_adapters(model, cfg, dtype)
    return model


def trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter that trains, by name (a tied weight once)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def saved_tensors(model: nn.Module, cfg: Config) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(weights, train_only) for a checkpoint of a run with this method (module docstring)."""
    if cfg.lora_kind:
        return adapter_state_dict(model), {}
    if cfg.finetune == "prefix" and isinstance(model.prefix, PrefixEncoder):
        return folded_state_dict(model), trained_tensors(model)  # fold: the MLP's output, the MLP for resuming
    return trained_tensors(model), {}


def load_trained(model: nn.Module, cfg: Config, weights: dict[str, Tensor], train_only: dict[str, Tensor]) -> None:
    """Copy saved tensors into a model built by apply_method with the same config. A prefix model built for
    training takes train_only (the MLP: the folded weights follow from it); every other takes weights."""
    if cfg.lora_kind:
        return load_adapter_state_dict(model, weights)
    saved = train_only if cfg.finetune == "prefix" and isinstance(model.prefix, PrefixEncoder) else weights
    copy_exactly(trained_tensors(model), saved, f"saved {cfg.finetune}",
                 keys_hint="n_layer, and that the run was saved by this method",
                 shape_hint="prefix_len, prefix_hidden, adapter_size, n_embd")


def method_config(cfg: Config, base_from: str | None = None) -> dict:
    """The JSON a run saves beside its tensors: the method, its shape, and the base (by content) it needs."""
    if cfg.lora_kind:
        return adapter_config(cfg, base_from)
    shape = {"prefix": ("prefix_len", "prefix_hidden"), "adapter": ("adapter_size",)}[cfg.finetune]
    config = {"finetune": cfg.finetune, **{key: getattr(cfg, key) for key in shape}, "base": base_from or cfg.init_from}
    if base_from and base_from != "scratch":
        identity = base_identity(base_from)
        config.update(base_path=identity["path"], base_sha256=identity["sha256"])
    return config


def cannot_merge(finetune: str) -> str | None:
    """Why a run of this method cannot be merged into its base's weights (None: it can, or there is nothing to merge)."""
    return {"prefix": PREFIX_NO_MERGE, "adapter": ADAPTER_NO_MERGE}.get(finetune)
