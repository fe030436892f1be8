"""The base a run starts from, wherever it lives: a nanoft checkpoint directory, or GPT-2 weights in Hugging Face's
layout (a model.safetensors; a Hub name is made one by nanoft.interop.hf.resolve); and the model any checkpoint
holds, ready to run (`load_model`: sample.py and python -m nanoft evaluate)."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from nanoft.config import Config
from nanoft.interop import hf
from nanoft.model import GPT
from nanoft.objectives import method_of
from nanoft.objectives.reward import RewardModel
from nanoft.run import checkpoint
from nanoft.run.adapter_base import check_adapter_base
from nanoft.run.base_model import load_base_model, model_from_checkpoint, take_base_shape


def resolve_base(cfg: Config, explicit: Iterable[str] = ()) -> Config:
    """cfg with the shape of the base it starts from: a GPT-2 (gpt2, a folder, a file; fetched by name), whose
    config.json sets it, or a nanoft checkpoint, whose saved config does; explicit: the command line's keys."""
    return take_base_shape(hf.resolve(cfg), explicit)


def load_pretrained(cfg: Config, source: str) -> GPT:
    """GPT(cfg) holding the weights at `source`: a nanoft checkpoint directory holding a full model (not an
    adapter), or a GPT-2 model.safetensors in Hugging Face layout (nanoft.interop.hf reads it)."""
    if source.endswith(".safetensors"):
        model = GPT(cfg)
        checkpoint.load_weights(model, hf.gpt2_state_dict(source, cfg), source)
        return model
    return load_base_model(cfg, source)


GPT2_SMALL = Config(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, dropout=0.0)


def load_model(source: str, device: str = "cpu") -> GPT:
    """The model a checkpoint holds, ready to run (sample.py, python -m nanoft evaluate): a GPT-2 by name, folder or
    model.safetensors; a nanoft full or quantized model; or an adapter (LoRA, QLoRA, prefixes, adapter layers)
    applied to the very base it was trained on. A reward model is refused: it scores text, it does not write it."""
    if hf.is_hf_source(source):  # a GPT-2 by name (fetched once), a folder or a model.safetensors
        cfg = hf.resolve(dataclasses.replace(GPT2_SMALL, init_from=source), announce=False)  # config.json: the shape
        return load_pretrained(cfg, cfg.init_from)
    ckpt = checkpoint.load(source)
    cfg = dataclasses.replace(Config.from_dict(ckpt.config), dropout=0.0, gradient_checkpointing=False)
    method = method_of(cfg)
    if method.objective is RewardModel:
        raise ValueError(f"{source} is a reward model: it scores text (python -m nanoft reward), it does not write it")
    peft = method.peft(cfg)
    if not peft:  # a full model, float or quantized (its layers stay quantized: python -m nanoft quantize)
        heads = method.objective.head_shapes(cfg.n_embd)  # PPO's value head: the critic, not part of the policy
        weights = {k: v for k, v in ckpt.model.items() if k not in heads}
        return model_from_checkpoint(cfg, weights, ckpt.extra.get("quant"), source)
    check_adapter_base(ckpt, source)  # the very base it was trained on, by content
    # LoRA/QLoRA adapters, folded prefixes or adapter layers: applied to their base (QLoRA quantizes on the device)
    model = peft.apply(load_pretrained(cfg, ckpt.base_from), cfg, device, for_training=False)
    peft.load(model, ckpt.model, {})
    return model
