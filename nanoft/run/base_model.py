"""The nanoft checkpoint a run starts from: its shape decides the model's, and its weights fill it.

    cfg = take_base_shape(cfg, explicit)       # --init_from=DIR (or resume): the shape the checkpoint was trained in
    model = load_base_model(cfg, cfg.init_from)

A base's weights have one shape, so a run starting from it takes that shape, as nanoGPT and litgpt do and as
--init_from=gpt2 takes config.json's: the user names the base, not its dimensions. The keys that change are
printed. Only what cannot be is refused, in one line: a shape key given on the command line that differs from
the base's, or a block_size above the base's (its position embeddings end there; a config file's larger
block_size is cut to the base's instead). Resuming takes the run's own saved shape, its adapters' included.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path

from nanoft.config import Config, ConfigError
from nanoft.model import GPT
from nanoft.run import checkpoint
from nanoft.run.distributed import launched_rank


def take_base_shape(cfg: Config, explicit: Iterable[str] = (), announce: bool = True) -> Config:
    """cfg with the shape of the nanoft checkpoint it starts from (init_from=DIR, or resume: out_dir's run);
    any other cfg as it is. explicit: the keys set on the command line (module docstring)."""
    resume = cfg.init_from == "resume"
    where = cfg.out_dir if resume else cfg.init_from
    if not (resume or Path(where).is_dir()) or not checkpoint.exists(where):
        return cfg
    saved = checkpoint.read_meta(where)["config"]
    keys = checkpoint.SHAPE_KEYS if resume else checkpoint.ARCH_KEYS + ("block_size",)
    shape, explicit = {}, set(explicit)
    for key in keys:
        if key not in saved:
            continue
        value = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
        if key == "block_size" and not resume:
            if cfg.block_size <= value:
                continue  # a shorter context than the base's is fine: its first positions
            if key in explicit:
                raise ConfigError(f"block_size={cfg.block_size} is above the base {where}'s {value}: its position "
                                  f"embeddings end there; set block_size <= {value}")
        if value != getattr(cfg, key) and key not in explicit:
            shape[key] = value
    changed = ", ".join(f"{k} {getattr(cfg, k)!r} -> {v!r}" for k, v in shape.items())
    if changed and announce and launched_rank() == 0:
        print(f"{where}: the model's shape is its checkpoint's: {changed}", file=sys.stderr)
    return dataclasses.replace(cfg, **shape)


def load_base_model(cfg: Config, source: str, keep_quantized: bool = False) -> GPT:
    """GPT(cfg) holding the full weights saved in checkpoint dir `source`. A run that saved only what a
    parameter-efficient method trained (its ckpt.json records the adapter) is refused in one line: a LoRA adapter
    can be merged first (python -m nanoft merge); prefixes and adapter layers are applied to their base by sample.py.
    A quantized checkpoint (python -m nanoft quantize; ckpt.json's extra.quant names the format and the layers) loads
    into that format's layers; unless keep_quantized, they are then dequantized into float Linears, so a run that
    starts from it trains (and adapters attach) as on any base, from the quantized model's numbers."""
    ckpt = checkpoint.load(source)
    adapter = ckpt.extra.get("adapter")
    if adapter:
        saved = Config.from_dict(ckpt.config)
        if saved.lora_kind:
            raise ValueError(f"{source} holds a LoRA adapter, not a full model: merge it first "
                             f"(python -m nanoft merge --adapter {source} --out DIR)")
        raise ValueError(f"{source} holds {saved.finetune} weights for a base, not a full model")
    checkpoint.check_compatible(ckpt.config, cfg.to_dict(), source, checkpoint.ARCH_KEYS)
    weights = {k: v for k, v in ckpt.model.items() if not k.startswith("value_head.")}  # a PPO run's critic
    weights["wpe.weight"] = weights["wpe.weight"][: cfg.block_size]  # fine-tuning may use a shorter context
    return model_from_checkpoint(cfg, weights, ckpt.extra.get("quant"), source, keep_quantized)


def model_from_checkpoint(cfg: Config, weights: dict, quant: dict | None, source: str,
                          keep_quantized: bool = True) -> GPT:
    """GPT(cfg) holding a full checkpoint's weights; quant (its ckpt.json's extra.quant, if any) swaps in the
    quantized layers first and, unless keep_quantized, dequantizes them after loading (load_base_model)."""
    model = GPT(cfg)
    if not quant:
        checkpoint.load_weights(model, weights, source)
        return model
    model.use_quantized_layers(quant)
    try:  # strict, but not load_weights' shape check: an NF4 layer's JSON state is as long as its text
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"quantized checkpoint {source} does not match its model: "
                                         f"{str(e).splitlines()[-1].strip()}") from None
    if not keep_quantized:
        model.dequantize_layers()
    return model
