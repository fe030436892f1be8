"""Parameter-efficient fine-tuning: one table from a method's name to the class that installs it, saves what it
trained and loads it back.

    lora     low-rank updates beside frozen linear layers                  nanoft/peft/lora.py, lora_model.py
    qlora    the same over NF4 block linears (nanoft.quant)                 nanoft/peft/lora_model.py
    prefix   trained key/value prefixes in every attention layer           nanoft/peft/prefix.py
    adapter  bottleneck layers after each block's attention and MLP         nanoft/peft/houlsby.py

Each one freezes the base model, stores its frozen weights in the run's compute dtype (bf16 on CUDA) and adds a
few tensors that train in float32. The protocol they share, which train.py, sample.py and the commands use (the
method table, nanoft.objectives.METHODS, says which one a run installs):

    model = peft.apply(model, cfg, device)                # the surgery
    weights, train_only = peft.saved(model)               # what a checkpoint holds: only what the method trained
    peft.load(model, weights, train_only)                 # strict: a missing, extra or misshapen tensor is an error
    extra["adapter"] = peft.config(cfg, base_from)        # the method, its shape, and its base by content
    peft.why_no_merge                                     # None where merging into the base is defined (LoRA)

`weights` is what runs the model (for prefix tuning the folded prefixes); `train_only` is what only a resumed
run needs beside them (for prefix tuning the MLP that produces the prefixes while training; empty otherwise).
sample.py rebuilds the base, applies the method with for_training=False and loads `weights`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nanoft.config import Config
from nanoft.peft.houlsby import WHY_NO_MERGE as ADAPTER_NO_MERGE
from nanoft.peft.houlsby import apply_adapters
from nanoft.peft.lora_model import (
    adapter_config,
    adapter_state_dict,
    apply_lora,
    compute_dtype,
    copy_exactly,
    load_adapter_state_dict,
    trainable_summary,
)
from nanoft.peft.prefix import WHY_NO_MERGE as PREFIX_NO_MERGE
from nanoft.peft.prefix import PrefixEncoder, apply_prefix, folded_state_dict
from nanoft.run.adapter_base import base_identity

__all__ = ["PEFT", "Adapters", "LoRA", "Prefix", "trainable_summary", "trained_tensors"]


def trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter that trains, by name (a tied weight once)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


class LoRA:
    """LoRA, or QLoRA when cfg says so (finetune=qlora, or finetune_weights=qlora): Config.lora_kind."""
    why_no_merge = None  # W = W0 + (alpha / r) B A: python -m nanoft merge

    @staticmethod
    def apply(model: nn.Module, cfg: Config, device=None, dtype: torch.dtype | None = None,
              for_training: bool = True) -> nn.Module:
        return apply_lora(model, cfg, device, dtype or compute_dtype(cfg))  # QLoRA quantizes each layer on the device

    @staticmethod
    def saved(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(the adapters, any other head that trains beside them: PPO's value head, which only resuming needs)."""
        adapters = adapter_state_dict(model)
        return adapters, {k: v for k, v in trained_tensors(model).items() if k not in adapters}

    @staticmethod
    def load(model: nn.Module, weights: dict[str, Tensor], train_only: dict[str, Tensor]) -> None:
        """The adapters; and, resuming (train_only given), the other heads that train, strictly."""
        load_adapter_state_dict(model, weights)
        heads = {k: v for k, v in trained_tensors(model).items() if k not in weights}
        if heads or train_only:
            copy_exactly(heads, train_only, "trained head", keys_hint="finetune", shape_hint="n_embd")

    @staticmethod
    def config(cfg: Config, base_from: str | None = None) -> dict:
        return adapter_config(cfg, base_from)


class _Frozen:
    """What prefix tuning and adapter layers share: a config of their own keys, a strict copy of what trained."""
    shape_keys: tuple[str, ...] = ()
    name = ""

    @classmethod
    def load(cls, model: nn.Module, weights: dict[str, Tensor], train_only: dict[str, Tensor]) -> None:
        copy_exactly(trained_tensors(model), cls._loaded(model, weights, train_only), f"saved {cls.name}",
                     keys_hint="n_layer, and that the run was saved by this method",
                     shape_hint="prefix_len, prefix_hidden, adapter_size, n_embd")

    @staticmethod
    def _loaded(model: nn.Module, weights: dict[str, Tensor], train_only: dict[str, Tensor]) -> dict[str, Tensor]:
        return weights

    @classmethod
    def config(cls, cfg: Config, base_from: str | None = None) -> dict:
        config = {"finetune": cfg.finetune, **{key: getattr(cfg, key) for key in cls.shape_keys},
                  "base": base_from or cfg.init_from}
        if base_from and base_from != "scratch":
            identity = base_identity(base_from)
            config.update(base_path=identity["path"], base_sha256=identity["sha256"])
        return config


class Prefix(_Frozen):
    """Prefix tuning: an MLP makes the prefixes while training; a checkpoint holds them folded (and the MLP, to
    resume)."""
    name, shape_keys, why_no_merge = "prefix", ("prefix_len", "prefix_hidden"), PREFIX_NO_MERGE

    @staticmethod
    def apply(model: nn.Module, cfg: Config, device=None, dtype: torch.dtype | None = None,
              for_training: bool = True) -> nn.Module:
        model = model.to(device) if device is not None else model
        return apply_prefix(model, cfg, dtype or compute_dtype(cfg), reparameterise=for_training)

    @staticmethod
    def saved(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if isinstance(model.prefix, PrefixEncoder):
            return folded_state_dict(model), trained_tensors(model)  # fold: the MLP's output, the MLP for resuming
        return trained_tensors(model), {}

    @staticmethod
    def _loaded(model: nn.Module, weights: dict[str, Tensor], train_only: dict[str, Tensor]) -> dict[str, Tensor]:
        return train_only if isinstance(model.prefix, PrefixEncoder) else weights  # training: the MLP


class Adapters(_Frozen):
    """Houlsby adapter layers (and the LayerNorms, which train with them)."""
    name, shape_keys, why_no_merge = "adapter", ("adapter_size",), ADAPTER_NO_MERGE

    @staticmethod
    def apply(model: nn.Module, cfg: Config, device=None, dtype: torch.dtype | None = None,
              for_training: bool = True) -> nn.Module:
        model = model.to(device) if device is not None else model
        return apply_adapters(model, cfg, dtype or compute_dtype(cfg))

    @staticmethod
    def saved(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return trained_tensors(model), {}


PEFT: dict[str, type] = {"lora": LoRA, "qlora": LoRA, "prefix": Prefix, "adapter": Adapters}
