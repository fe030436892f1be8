"""LoRA adapters in a whole GPT: put them in, count them, save and load them, merge them into the weights.

nanoft/peft/lora.py holds the layer and its maths (x -> W0 x + b + (alpha / r) B A dropout(x)); this file is the
model surgery around it. apply_lora freezes the GPT and wraps the linear layers named in cfg.lora_targets,
for QLoRA after quantizing every block linear to NF4; the frozen weights are stored in the compute dtype and
what trains stays float32 (why: nanoft/peft/lora.py's docstring). What a run saves is only what it trained: the
A and B tensors (and the LayerNorms under lora_train_norms), with adapter_config recording what rebuilds the
model and which base (by content) they were trained on. merge_lora folds every adapter into its weight,
W = W0 + (alpha / r) B A, and leaves a plain float GPT.

    model = apply_lora(GPT(cfg), cfg)       # cfg.finetune "lora" or "qlora"; everything else frozen
    print(trainable_summary(model))         # configs/lora.py: trainable params: 18,688 of 7,256,832 (0.26%)
    sd = adapter_state_dict(model)          # the A and B tensors (and trained norms): 73 KiB for configs/lora.py
    merged = merge_lora(model)              # plain nn.Linear layers again: no LoRA code needed to run it
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nanoft.config import LORA_TARGETS, Config
from nanoft.peft.lora import LoRALinear, float_weight, plain_linear
from nanoft.quant.nf4 import Linear4bit
from nanoft.run.adapter_base import base_identity
from nanoft.run.precision import frozen_dtype, pick_device

# the linear layers of one GPT block, by the attribute path inside the block
BLOCK_LINEARS = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj",
                 "out_proj": "attn.out_proj", "fc_in": "mlp.fc_in", "fc_out": "mlp.fc_out"}
assert set(BLOCK_LINEARS) == set(LORA_TARGETS)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype the frozen base is stored in and the NF4 weights dequantize to, by nanoft.run.precision's rule
    (frozen_dtype: the run's compute dtype on a GPU, float32 on a CPU unless cfg.dtype names another)."""
    return frozen_dtype(cfg.dtype, pick_device(cfg.device))


def apply_lora(model: nn.Module, cfg: Config, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> nn.Module:
    """Turn a GPT into a LoRA ("lora") or QLoRA ("qlora") model in place and return it; "full" and
    "none" return it unchanged.

    lora:  every parameter is frozen, then the linear layers named in cfg.lora_targets (in every block)
           are wrapped in LoRALinear; only the adapters train.
    qlora: first every linear layer of the blocks (q, k, v, out, fc_in, fc_out; the frozen base) becomes
           an NF4 Linear4bit (cfg.nf4_blocksize, cfg.double_quant, compute dtype as compute_dtype(cfg)),
           then the targets get adapters in that compute dtype.
    device: where the model will run. QLoRA moves each linear there just before quantizing it, so the
    quantization runs on that device (the Triton kernel on CUDA) and the full float model never sits on it.
    dtype: what the frozen float weights are stored in (default compute_dtype(cfg); see the module
    docstring); the adapters and trained norms are float32 whatever it is.
    Embeddings and the tied head stay float and frozen in both. The LayerNorms stay float too, and train
    when cfg.lora_train_norms (as LongLoRA, arXiv:2309.12307, trains them): 2 * n_embd numbers each.
    Why that can matter: the head's logits are ln_f(h) @ wte^T. With ln_f and wte frozen, ln_f's output
    has a fixed size, so the logits have a bounded range whatever the adapters do to h, and on a weakly
    trained base that range is too narrow to make a rare token likely: on configs/tiny.py's base, the best
    any h can give <|endoftext|> is -log p = 6.3, and " HAM" (as in " HAMLET") 8.1. Training ln_f's gain
    lifts that cap; a well-trained base rarely needs it."""
    if not cfg.lora_kind:  # finetune=lora/qlora, or dpo with finetune_weights=lora/qlora
        return model
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; apply_lora must be called once")
    model.requires_grad_(False)
    dtype = dtype or compute_dtype(cfg)
    for i in range(len(model.blocks)):
        if cfg.lora_kind == "qlora":
            for path in BLOCK_LINEARS.values():
                linear = model.blocks[i].get_submodule(path)
                if device is not None:
                    linear = linear.to(device)
                q = Linear4bit.from_linear(linear, blocksize=cfg.nf4_blocksize, double_quant=cfg.double_quant,
                                           compute_dtype=dtype)
                _set_submodule(model.blocks[i], path, q)  # the float weight is freed with `linear`
        for target in cfg.lora_targets:
            path = BLOCK_LINEARS[target]
            base = model.blocks[i].get_submodule(path)
            lora = LoRALinear(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
            _set_submodule(model.blocks[i], path, lora)
    if cfg.lora_train_norms:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.requires_grad_(True)
    with torch.no_grad():  # frozen: compute dtype; trained: float32 master weights
        for p in model.parameters():
            p.data = p.data.to(dtype if not p.requires_grad and p.is_floating_point() else p.dtype)
    return model.to(device) if device is not None else model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain frozen nn.Linear holding W0 + (alpha/r) B A (for an NF4 base,
    W0 is the dequantized weight: the one the adapter was trained against). Returns the model, which
    then holds no LoRA code; NF4 layers without adapters (QLoRA's non-targets) are dequantized too, so
    the result is an ordinary float GPT that loads into nanoft.model.gpt.GPT."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.unmerge()  # back to W0 (exactly, for NF4), so every case below is the same
            weight = float_weight(m.base)
            _set_submodule(model, name, plain_linear(m.base, weight + m.delta_weight().to(weight.dtype)))
        for name, m in list(model.named_modules()):
            if isinstance(m, Linear4bit):
                _set_submodule(model, name, plain_linear(m, m.dequantize()))
    return model


# --- adapters on disk ----------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a LoRA run trained, keyed by module path: the adapter tensors {"blocks.0.attn.q_proj.lora_A":
    (r, in), ...}, plus the LayerNorms' {"ln_f.weight": (n_embd,), ...} when they trained (lora_train_norms)."""
    sd = {f"{name}.{p}": getattr(m, p).detach() for name, m in lora_modules(model).items()
          for p in m.adapter_params()}
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            sd.update({f"{name}.{k}": p.detach() for k, p in m.named_parameters() if p.requires_grad})
    return sd


def load_adapter_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Copy saved adapters into a model built by apply_lora with the same targets and rank. Strict: any
    missing or unexpected key, or a wrong shape, is a ValueError naming it; nothing is copied then."""
    copy_exactly(adapter_state_dict(model), sd, "adapter", keys_hint="lora_targets, lora_train_norms and n_layer",
                 shape_hint="lora_r and n_embd")


def copy_exactly(own: dict[str, Tensor], saved: dict[str, Tensor], what: str, keys_hint: str, shape_hint: str) -> None:
    """Copy `saved` into the tensors of `own` (views of the model's parameters), all or nothing: a missing or
    unexpected name, or a shape that differs, is a ValueError naming it and what to check, before anything moves."""
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        def some(names: list[str]) -> str:
            return f"{names[:4]}{' ...' if len(names) > 4 else ''}"
        raise ValueError(f"{what} tensors do not match the model: missing {some(missing)}, unexpected "
                         f"{some(unexpected)} (check {keys_hint})")
    for name, t in saved.items():
        if t.shape != own[name].shape:
            raise ValueError(f"{what} tensor {name} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(own[name].shape)} (check {shape_hint})")
    with torch.no_grad():
        for name, t in saved.items():
            own[name].copy_(t)  # own[name] shares storage with the parameter


def adapter_config(cfg: Config, base_from: str | None = None) -> dict:
    """What is needed to rebuild the adapted model: saved beside the adapter weights as JSON. Given the base
    it was trained on, it also records that base by content (its absolute path and the sha256 of its tensor
    file), so that applying the adapter to another base, or to the same path trained further, is refused."""
    config = {"finetune": cfg.finetune, "r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
              "targets": list(cfg.lora_targets), "train_norms": cfg.lora_train_norms, "base": base_from or cfg.init_from,
              "nf4_blocksize": cfg.nf4_blocksize, "double_quant": cfg.double_quant}
    if base_from and base_from != "scratch":
        identity = base_identity(base_from)
        config.update(base_path=identity["path"], base_sha256=identity["sha256"])
    return config


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor counted once (the tied head is the embedding). An NF4
    weight counts as its in*out logical elements: it is still that many weights, held in 4 bits."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen or p.dtype == torch.uint8:  # uint8: packed NF4 codes, counted below instead
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            total += m.in_features * m.out_features
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    trainable, total = count_params(model)
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
