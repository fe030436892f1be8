"""The base a run starts from, wherever it lives: a nanoft checkpoint directory, or GPT-2 weights in Hugging Face's
layout (a model.safetensors; a Hub name is made one by nanoft.interop.hf.resolve)."""
from __future__ import annotations

from collections.abc import Iterable

from nanoft.config import Config
from nanoft.interop import hf
from nanoft.model import GPT
from nanoft.run import checkpoint
from nanoft.run.base_model import load_base_model, take_base_shape


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
