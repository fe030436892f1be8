"""Which rows a run trains and evaluates on, by what it learns:

    pretraining, distillation   random windows of a token file (nanoft.data.Batches): next-token prediction
    SFT (full, LoRA, QLoRA,     prompt/response pairs (nanoft.sft.SFTBatches): the loss on the response only
      prefix, adapter)
    DPO, reward model           prompt/chosen/rejected pairs (nanoft.preferences.PreferenceBatches)

Every kind has the same contract: `next()` gives the next batch on the device, `state_dict()` /
`load_state_dict()` its position (what a checkpoint records), and rank r of a data-parallel run draws its own
rows of each global batch. Validation uses seed + 1, so its rows never follow the training order.
"""
from __future__ import annotations

from nanoft import distributed, run_guard
from nanoft.config import Config
from nanoft.corpus import ensure_dataset
from nanoft.data import Batches
from nanoft.preferences import PreferenceBatches, load_preference_splits
from nanoft.sft import SFTBatches, load_sft_splits


def make_batches(cfg: Config, dist: distributed.Dist, device: str) -> tuple[object, object, list]:
    """(train batches, val batches, val examples): the examples are the pairs a fine-tune is scored on after
    training (empty for token files)."""
    if cfg.finetune in ("none", "distill"):
        if dist.is_master:
            ensure_dataset(cfg.dataset)  # prepared once, by rank 0 (Shakespeare is prepared on first use)
        distributed.barrier(dist)  # the other ranks wait for it
        data_dir = run_guard.check_token_files(ensure_dataset(cfg.dataset), cfg.vocab_size)  # whole ids < vocab
        train, val = (Batches(data_dir / f"{split}.bin", cfg.batch_size, cfg.block_size, seed, device, dist.rank,
                              dist.world_size) for split, seed in (("train", cfg.seed), ("val", cfg.seed + 1)))
        return train, val, []
    preferences = cfg.finetune in ("dpo", "reward")
    load, Rows = (load_preference_splits, PreferenceBatches) if preferences else (load_sft_splits, SFTBatches)
    train_examples, val_examples = load(cfg)
    train, val = (Rows(examples, cfg.batch_size, cfg.block_size, seed, device, dist.rank, dist.world_size)
                  for examples, seed in ((train_examples, cfg.seed), (val_examples, cfg.seed + 1)))
    return train, val, val_examples
