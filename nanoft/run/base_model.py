"""A full model from a nanoft checkpoint directory: the base a fine-tune, a teacher or sample.py starts from."""
from __future__ import annotations

from nanoft.config import Config
from nanoft.model import GPT
from nanoft.run import checkpoint


def load_base_model(cfg: Config, source: str) -> GPT:
    """GPT(cfg) holding the full weights saved in checkpoint dir `source`. A run that saved only what a
    parameter-efficient method trained (its ckpt.json records the adapter) is refused in one line: a LoRA adapter
    can be merged first (python -m nanoft merge); prefixes and adapter layers are applied to their base by sample.py."""
    ckpt = checkpoint.load(source)
    adapter = ckpt.extra.get("adapter")
    if adapter:
        saved = Config.from_dict(ckpt.config)
        if saved.lora_kind:
            raise ValueError(f"{source} holds a LoRA adapter, not a full model: merge it first "
                             f"(python -m nanoft merge --adapter {source} --out DIR)")
        raise ValueError(f"{source} holds {saved.finetune} weights for a base, not a full model")
    checkpoint.check_compatible(ckpt.config, cfg.to_dict(), source, checkpoint.ARCH_KEYS)
    weights = dict(ckpt.model)
    weights["wpe.weight"] = weights["wpe.weight"][: cfg.block_size]  # fine-tuning may use a shorter context
    model = GPT(cfg)
    checkpoint.load_weights(model, weights, source)
    return model
