"""The shape of a model, without building it: the dimensions that decide how much memory it needs.

`ModelShape` describes nanoft's GPT-2-shaped model (from a Config), a published preset (LLaMA-2 7B/13B/70B,
GPT-2, GPT-2 XL) or a bare parameter count; `param_specs` lists every parameter tensor it has, name and shape,
exactly as `GPT(cfg).parameters()` would (the tied head counted once). nanoft.tools.memory.estimate turns these into
bytes; nothing here allocates a tensor.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from nanoft.config import Config
from nanoft.objectives import method_of

GB, MiB, GiB = 10**9, 2**20, 2**30  # the rule's GB is decimal; the tables use binary MiB/GiB

# bytes per element of the dtypes that occur
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide memory. arch "gpt" is nanoft's GPT-2 shape (LayerNorm, GELU MLP of 4x,
    learned positions, tied head); "llama" is LLaMA's (RMSNorm, SwiGLU MLP, RoPE, grouped-query attention,
    untied head, no biases); "nominal" is only a parameter count."""
    arch: str
    n_layer: int = 0
    n_embd: int = 0  # residual width (LLaMA's hidden_size)
    n_head: int = 1
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 means n_head
    intermediate: int = 0  # MLP hidden width; 0 means 4 * n_embd
    vocab_size: int = 0
    block_size: int = 0  # rows of the learned position table (GPT only)
    bias: bool = True  # GPT: biases in Linear and LayerNorm
    tied: bool = True  # head weight is the token embedding
    nominal_params: int = 0  # arch "nominal": the count itself

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn(self) -> int:
        return self.intermediate or 4 * self.n_embd

    @staticmethod
    def from_config(cfg: Config) -> ModelShape:
        return ModelShape("gpt", cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head, 4 * cfg.n_embd,
                          cfg.vocab_size, cfg.block_size, cfg.bias, tied=cfg.tie_embeddings)

    def num_params(self) -> int:
        return sum(p.numel for p in param_specs(self))


def frozen_model_shapes(cfg: Config, shape: ModelShape) -> list[ModelShape]:
    """The frozen models a run keeps beside the one it trains (float32 weights, used under no_grad): DPO, PPO and
    GRPO with full weights keep their starting model as the reference (with LoRA the reference is the same model
    with its adapters off: none); distillation keeps its teacher, PPO and GRPO their reward model, each in the shape
    its checkpoint's ckpt.json records."""
    shapes = []
    for frozen in method_of(cfg).objective.frozen_models:
        if frozen == "reference":
            shapes += [] if cfg.lora_kind else [shape]
            continue
        source = cfg.teacher_from if frozen == "teacher" else cfg.reward_from
        meta = Path(source) / "ckpt.json"
        if not meta.is_file():
            raise ValueError(f"{frozen}_from={source!r} holds no checkpoint to read the {frozen} model's shape from")
        saved = Config.from_dict(json.loads(meta.read_text())["config"])
        block_size = cfg.block_size if frozen == "teacher" else saved.block_size  # a teacher reads the student's context
        shapes.append(ModelShape.from_config(dataclasses.replace(saved, block_size=block_size)))
    return shapes


# Presets: published dimensions. LLaMA-2 7B (hidden 4096, 32 layers, SwiGLU 11008, 32 heads, vocab 32000) has
# 6.74e9 parameters and LLaMA-2 70B (8192, 80 layers, 28672, 64 heads of which 8 key/value) 68.98e9: the
# rule's "7B" and "70B" are round numbers, reproduced exactly by the nominal presets "7b" and "70b".
PRESETS = {
    "llama-7b": ModelShape("llama", 32, 4096, 32, 32, 11008, 32000, 0, bias=False, tied=False),
    "llama-13b": ModelShape("llama", 40, 5120, 40, 40, 13824, 32000, 0, bias=False, tied=False),
    "llama-70b": ModelShape("llama", 80, 8192, 64, 8, 28672, 32000, 0, bias=False, tied=False),
    "gpt2": ModelShape("gpt", 12, 768, 12, 12, 3072, 50257, 1024),
    "gpt2-xl": ModelShape("gpt", 48, 1600, 25, 25, 6400, 50257, 1024),
    "7b": ModelShape("nominal", nominal_params=7 * 10**9),
    "70b": ModelShape("nominal", nominal_params=70 * 10**9),
}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor: its name, shape, and for a block linear the LoRA target name it answers to."""
    name: str
    shape: tuple
    target: str = ""  # q_proj ... fc_out for block linears (LLaMA's are mapped onto these names)
    norm: bool = False  # a LayerNorm/RMSNorm gain or bias (trainable under lora_train_norms)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_specs(shape: ModelShape) -> list[ParamSpec]:
    """Every parameter tensor, the tied head counted once: the list `GPT(cfg).parameters()` yields."""
    if shape.arch == "nominal":
        return [ParamSpec("all", (shape.nominal_params,))]
    C, V, L = shape.n_embd, shape.vocab_size, shape.n_layer
    specs = [ParamSpec("wte.weight", (V, C))]
    if shape.arch == "gpt":
        specs.append(ParamSpec("wpe.weight", (shape.block_size, C)))
    for i in range(L):
        b = f"blocks.{i}."
        norms = ("ln_1", "ln_2") if shape.arch == "gpt" else ("input_norm", "post_attention_norm")
        kv = shape.kv_heads * (C // shape.n_head)  # width of k and v: fewer heads under grouped-query attention
        if shape.arch == "gpt":
            linears = [("attn.q_proj", C, C, "q_proj"), ("attn.k_proj", C, C, "k_proj"), ("attn.v_proj", C, C, "v_proj"),
                       ("attn.out_proj", C, C, "out_proj"), ("mlp.fc_in", C, shape.ffn, "fc_in"),
                       ("mlp.fc_out", shape.ffn, C, "fc_out")]
        else:  # LLaMA: the gate and up projections both answer to fc_in, down to fc_out
            linears = [("attn.q_proj", C, C, "q_proj"), ("attn.k_proj", C, kv, "k_proj"), ("attn.v_proj", C, kv, "v_proj"),
                       ("attn.o_proj", C, C, "out_proj"), ("mlp.gate_proj", C, shape.ffn, "fc_in"),
                       ("mlp.up_proj", C, shape.ffn, "fc_in"), ("mlp.down_proj", shape.ffn, C, "fc_out")]
        specs += _norm(shape, b + norms[0]) + _norm(shape, b + norms[1])
        for path, fan_in, fan_out, target in linears:
            specs.append(ParamSpec(b + path + ".weight", (fan_out, fan_in), target))
            if shape.bias and shape.arch == "gpt":
                specs.append(ParamSpec(b + path + ".bias", (fan_out,)))
    specs += _norm(shape, "ln_f" if shape.arch == "gpt" else "norm")
    if not shape.tied:
        specs.append(ParamSpec("lm_head.weight", (V, C)))
    return specs


def _norm(shape: ModelShape, name: str) -> list[ParamSpec]:
    specs = [ParamSpec(name + ".weight", (shape.n_embd,), norm=True)]
    if shape.arch == "gpt" and shape.bias:  # LayerNorm(bias=...); RMSNorm has no bias
        specs.append(ParamSpec(name + ".bias", (shape.n_embd,), norm=True))
    return specs
