"""LoRA and QLoRA: train a few low-rank matrices beside a frozen model instead of the model itself.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) keeps a pretrained linear layer W0 frozen and
learns a low-rank update beside it:

    x -> W0 x + b + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r), r << min(in, out)

Only A and B are trained: r * (in + out) numbers instead of in * out. B starts at zero, so at
initialisation the wrapped layer computes exactly what the base layer did, and fine-tuning starts from
the pretrained model rather than from a perturbed one. alpha / r scales the update so that changing r
does not force re-tuning the learning rate.

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) additionally stores the frozen W0 as
4-bit NormalFloat with double-quantized block scales (`nanoft.quant.Linear4bit`), dequantized on the fly
in the compute dtype.

Precision, as peft and litgpt do it: everything frozen (embeddings, the frozen linears, frozen norms) is
stored in the compute dtype (bfloat16 on CUDA: half the bytes of float32; float32 on CPU), while what
trains (the adapters, and norms under lora_train_norms) keeps float32 master weights. Under bf16 autocast
the matmuls still run in bf16, but the optimizer adds its small late updates to float32 numbers, where a
bf16 weight would round them away (bf16 keeps 8 significant bits: 1 + 1e-3 == 1).

    model = apply_lora(GPT(cfg), cfg)       # cfg.finetune "lora" or "qlora"; everything else frozen
    print(trainable_summary(model))         # configs/lora.py: trainable params: 18,688 of 7,256,832 (0.26%)
    sd = adapter_state_dict(model)          # the A and B tensors (and trained norms): 73 KiB for configs/lora.py
    merged = merge_lora(model)              # plain nn.Linear layers again: no LoRA code needed to run it

    python -m nanoft.lora merge --adapter out/lora --out out/lora-merged   # then: python sample.py out/lora-merged
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanoft.config import LORA_TARGETS, Config
from nanoft.precision import pick_device, pick_dtype

# the linear layers of one GPT block, by the attribute path inside the block
BLOCK_LINEARS = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj",
                 "out_proj": "attn.out_proj", "fc_in": "mlp.fc_in", "fc_out": "mlp.fc_out"}
assert set(BLOCK_LINEARS) == set(LORA_TARGETS)


def _is_linear4bit(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return False
    try:  # imported lazily: plain LoRA must work without the NF4 kernels (and without triton)
        from nanoft.quant import Linear4bit
    except ImportError:
        return False
    return isinstance(module, Linear4bit)


def _float_weight(base: nn.Module) -> Tensor:
    """The base layer's weight as a float tensor: the parameter itself, or the NF4 weight dequantized."""
    if isinstance(base, nn.Linear):
        return base.weight
    return base.dequantize()


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: x -> W0 x + b + (alpha / r) B A dropout(x).

    base: an nn.Linear or a nanoft.quant.Linear4bit; it is frozen here (requires_grad False).
    Init: (1) A ~ Kaiming-uniform(a=sqrt(5)), as nn.Linear initialises its weight, so the A x features
    start at a sensible scale; (2) B = 0, so the update B A is zero and the output equals the base's.
    The adapters live on the base's device, in float32 (master weights; see the module docstring).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {r}")
        if not (isinstance(base, nn.Linear) or _is_linear4bit(base)):
            raise TypeError(f"LoRALinear wraps nn.Linear or Linear4bit, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device  # for an NF4 base, base.weight holds the packed codes
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=torch.float32))
        self.merged = False
        self._quantized_base: nn.Module | None = None  # the NF4 base, put aside while merged
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # step 1: A random
        nn.init.zeros_(self.lora_B)  # step 2: B zero, so B A = 0 and the layer starts as the base

    def adapter_params(self) -> list[str]:
        """Names of the trainable adapter parameters of this module (torchtune's convention)."""
        return ["lora_A", "lora_B"]

    def delta_weight(self) -> Tensor:
        """(alpha / r) B A: the (out, in) matrix the adapter adds to W0."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)  # (..., out)
        if self.merged:  # the update already sits inside the base weight
            return out
        d = self.dropout(x)
        if not torch.is_autocast_enabled(d.device.type):  # under autocast F.linear casts both sides itself
            d = d.to(self.lora_A.dtype)
        h = F.linear(d, self.lora_A)  # (..., r): the narrow bottleneck
        return out + self.scaling * F.linear(h, self.lora_B).to(out.dtype)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight so inference costs one matmul: W = W0 + (alpha/r) B A.

        For an nn.Linear base the weight is changed in place. A 4-bit weight cannot hold W0 + BA without
        re-quantizing (which would lose the update in rounding), so for a Linear4bit base merging means
        dequantize + add: the base becomes a float nn.Linear (in the compute dtype) and the NF4 layer is
        kept aside, so that unmerge() restores it bit for bit. Adapters get no gradient while merged."""
        if self.merged:
            return
        if isinstance(self.base, nn.Linear):
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        else:
            self._quantized_base = self.base
            self.base = _plain_linear(self.base, _float_weight(self.base) + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): subtract the update again (float base; exact up to rounding) or put the NF4 base back."""
        if not self.merged:
            return
        if self._quantized_base is not None:
            self.base, self._quantized_base = self._quantized_base, None
        else:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _plain_linear(like: nn.Module, weight: Tensor) -> nn.Linear:
    """A frozen nn.Linear with `weight` and the bias of `like`."""
    bias = getattr(like, "bias", None)
    linear = nn.Linear(like.in_features, like.out_features, bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias.to(weight.dtype))
    linear.requires_grad_(False)
    return linear


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def compute_dtype(cfg: Config) -> torch.dtype:
    """The run's compute dtype, by nanoft.precision's rule (bf16 on a CUDA GPU that has it, else fp16 there,
    float32 elsewhere): the dtype the frozen base is stored in and the NF4 weights dequantize to."""
    return pick_dtype(cfg.dtype, pick_device(cfg.device))


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
    if cfg.finetune not in ("lora", "qlora"):
        return model
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; apply_lora must be called once")
    model.requires_grad_(False)
    dtype = dtype or compute_dtype(cfg)
    for i in range(len(model.blocks)):
        if cfg.finetune == "qlora":
            from nanoft.quant import Linear4bit

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
    the result is an ordinary float GPT that loads into nanoft.model.GPT."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.unmerge()  # back to W0 (exactly, for NF4), so every case below is the same
            weight = _float_weight(m.base)
            _set_submodule(model, name, _plain_linear(m.base, weight + m.delta_weight().to(weight.dtype)))
        for name, m in list(model.named_modules()):
            if _is_linear4bit(m):
                _set_submodule(model, name, _plain_linear(m, m.dequantize()))
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
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter does not match the model's LoRA layers: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''} (check lora_targets, lora_train_norms and n_layer)")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)} but the model expects "
                             f"{tuple(own[k].shape)} (check lora_r and n_embd)")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)  # own[k] shares storage with the parameter


def adapter_config(cfg: Config, base_from: str | None = None) -> dict:
    """What is needed to rebuild the adapted model: saved beside the adapter weights as JSON. Given the base
    it was trained on, it also records that base by content (its absolute path and the sha256 of its tensor
    file), so that applying the adapter to another base, or to the same path trained further, is refused."""
    config = {"finetune": cfg.finetune, "r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
              "targets": list(cfg.lora_targets), "train_norms": cfg.lora_train_norms, "base": base_from or cfg.init_from,
              "nf4_blocksize": cfg.nf4_blocksize, "double_quant": cfg.double_quant}
    if base_from and base_from != "scratch":
        from nanoft.run_guard import base_identity

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
        if _is_linear4bit(m):
            total += m.in_features * m.out_features
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    trainable, total = count_params(model)
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


# --- the merge command ---------------------------------------------------------------------------

def merge_checkpoint(adapter_dir: str, out_dir: str, base: str | None = None, overwrite: bool = False) -> Path:
    """Read a LoRA/QLoRA run's checkpoint (adapter weights + config), rebuild its base, merge, and save
    a full nanoft checkpoint with finetune="none" that sample.py and train.py load with no LoRA code.
    For QLoRA the merged weights are the NF4-dequantized base plus the update: the function the adapter
    was trained with (adding it to the original float base would differ by the quantization error)."""
    from nanoft import checkpoint
    from nanoft.model import load_pretrained
    from nanoft.run_guard import check_adapter_base, check_output_dir, lock_dir

    ck = checkpoint.load(adapter_dir)
    cfg = dataclasses.replace(Config.from_dict(ck.config), gradient_checkpointing=False)
    if cfg.finetune not in ("lora", "qlora"):
        raise ValueError(f"{adapter_dir} holds a finetune={cfg.finetune!r} run, not a LoRA adapter")
    base = base or ck.base_from
    check_output_dir(out_dir, [adapter_dir, base], overwrite)  # never write into what we read
    check_adapter_base(ck, adapter_dir, base)
    owner = lock_dir(out_dir, "python -m nanoft.lora merge")  # noqa: F841 (held until we return)
    model = apply_lora(load_pretrained(cfg, base), cfg, dtype=torch.float32)  # merge in float32, whatever the run's dtype
    load_adapter_state_dict(model, ck.model)
    model = merge_lora(model).float()
    merged_cfg = dataclasses.replace(cfg, finetune="none", init_from="scratch", out_dir=str(out_dir))
    return checkpoint.save(out_dir, checkpoint.Checkpoint(
        step=ck.step, config=merged_cfg.to_dict(), model=model.state_dict(), base_from=base,
        extra={"merged_from": str(adapter_dir), "adapter": adapter_config(cfg)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanoft.lora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge an adapter checkpoint into its base; write a full checkpoint")
    merge.add_argument("--adapter", required=True, help="out_dir of a lora/qlora run (ckpt.json inside)")
    merge.add_argument("--out", required=True, help="directory for the merged full checkpoint")
    merge.add_argument("--base", default=None, help="the base's path, if it moved (its content must match the recorded one)")
    merge.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    args = parser.parse_args(argv)
    from nanoft.checkpoint import CheckpointError

    try:
        path = merge_checkpoint(args.adapter, args.out, args.base, args.overwrite)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"merged {args.adapter} into its base: wrote {path}")


if __name__ == "__main__":
    main()
