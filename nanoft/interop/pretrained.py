"""The base a run starts from, wherever it lives: a nanoft checkpoint directory, or GPT-2 weights in Hugging Face's
layout (a model.safetensors; a Hub name is made one by nanoft.interop.hf.resolve)."""
from __future__ import annotations

from nanoft.config import Config
from nanoft.interop import hf
from nanoft.model import GPT
from nanoft.run import checkpoint
from nanoft.run.base_model import load_base_model


def load_pretrained(cfg: Config, source: str) -> GPT:
    """GPT(cfg) holding the weights at `source`: a nanoft checkpoint directory holding a full model (not an
    adapter), or a GPT-2 model.safetensors in Hugging Face layout (nanoft.interop.hf reads it)."""
    if source.endswith(".safetensors"):
        model = GPT(cfg)
        checkpoint.load_weights(model, hf.gpt2_state_dict(source, cfg), source)
        return model
    return load_base_model(cfg, source)
