"""Merge a LoRA/QLoRA run's adapter into its base and write a full checkpoint that needs no LoRA code.

    python -m nanoft merge --adapter out/lora --out out/lora-merged   # then: python sample.py out/lora-merged

Each adapted layer becomes W = W0 + (alpha / r) B A (nanoft/peft/lora.py); for QLoRA W0 is the NF4-dequantized
base (merge_checkpoint says why). The merge runs in float32 whatever the run's dtype, refuses a base whose content
differs from the one the adapter recorded, and never writes into a directory it reads.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from nanoft.config import Config
from nanoft.interop.pretrained import load_pretrained
from nanoft.model import GPT
from nanoft.objectives import method_of
from nanoft.peft.lora_model import adapter_config, apply_lora, load_adapter_state_dict, merge_lora
from nanoft.peft.methods import LoRA
from nanoft.run import checkpoint
from nanoft.run.adapter_base import check_adapter_base
from nanoft.run.checkpoint import CheckpointError
from nanoft.run.out_dir import check_output_dir, lock_dir


def merge_checkpoint(adapter_dir: str, out_dir: str, base: str | None = None, overwrite: bool = False) -> Path:
    """Read a LoRA/QLoRA run's checkpoint (adapter weights + config), rebuild its base, merge, and save
    a full nanoft checkpoint with finetune="none" that sample.py and train.py load with no LoRA code.
    For QLoRA the merged weights are the NF4-dequantized base plus the update: the function the adapter
    was trained with (adding it to the original float base would differ by the quantization error)."""
    ck = checkpoint.load(adapter_dir)
    cfg = dataclasses.replace(Config.from_dict(ck.config), gradient_checkpointing=False)
    check_mergeable(cfg, adapter_dir)
    base = base or ck.base_from
    check_output_dir(out_dir, [adapter_dir, base], overwrite)  # never write into what we read
    check_adapter_base(ck, adapter_dir, base)
    owner = lock_dir(out_dir, "python -m nanoft merge")  # noqa: F841 (held until we return)
    model = merged_model(ck, cfg, base)
    merged_cfg = dataclasses.replace(cfg, finetune="none", init_from="scratch", out_dir=str(out_dir))
    return checkpoint.save(out_dir, checkpoint.Checkpoint(
        step=ck.step, config=merged_cfg.to_dict(), model=model.state_dict(), base_from=base,
        extra={"merged_from": str(adapter_dir), "adapter": adapter_config(cfg)}))


def check_mergeable(cfg: Config, adapter_dir: str) -> None:
    """One line, unless the run in adapter_dir is a LoRA/QLoRA adapter that folds into its base."""
    peft = method_of(cfg).peft(cfg)
    if peft and peft.why_no_merge:
        raise ValueError(f"{adapter_dir} holds a {cfg.finetune} run, which cannot be merged: {peft.why_no_merge}")
    if peft is not LoRA:
        raise ValueError(f"{adapter_dir} holds a finetune={cfg.finetune!r} run, not a LoRA adapter")


def merged_model(ck: checkpoint.Checkpoint, cfg: Config, base: str) -> GPT:
    """The base (already checked to be the adapter's) with the adapter folded in: a plain float32 GPT."""
    model = apply_lora(load_pretrained(cfg, base), cfg, dtype=torch.float32)  # merge in float32, whatever the run's dtype
    load_adapter_state_dict(model, ck.model)
    return merge_lora(model).float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanoft merge", description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="out_dir of a lora/qlora run (ckpt.json inside)")
    parser.add_argument("--out", required=True, help="directory for the merged full checkpoint")
    parser.add_argument("--base", default=None, help="the base's path, if it moved (its content must match the recorded one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    args = parser.parse_args(argv)
    try:
        path = merge_checkpoint(args.adapter, args.out, args.base, args.overwrite)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"merged {args.adapter} into its base: wrote {path}")


if __name__ == "__main__":
    main()
