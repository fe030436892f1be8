"""Which rows a run trains and evaluates on, by what it learns:

    pretraining, distillation   random windows of a token file (nanoft.data.tokens.Batches): next-token prediction
    SFT (full, LoRA, QLoRA,     prompt/response pairs (nanoft.data.sft.SFTBatches): the loss on the response only
      prefix, adapter)
    DPO, reward model           prompt/chosen/rejected pairs (nanoft.data.preferences.PreferenceBatches)

Every kind has the same contract: `next()` gives the next batch on the device, `state_dict()` /
`load_state_dict()` its position (what a checkpoint records), and rank r of a data-parallel run draws its own
rows of each global batch. Validation uses seed + 1, so its rows never follow the training order.
"""
from __future__ import annotations

import torch

from nanoft.config import Config
from nanoft.data.corpus import ensure_dataset
from nanoft.data.preferences import PreferenceBatches, load_preference_splits
from nanoft.data.sft import SFTBatches, load_sft_splits
from nanoft.data.tokens import Batches, check_token_files


def make_batches(cfg: Config, kind: str, dist, device: str) -> tuple[object, object, list]:
    """(train batches, val batches, val examples) of data `kind` ("tokens", "sft" or "preferences": the method's,
    nanoft.objectives.METHODS) for this rank of `dist` (nanoft.run.distributed.Dist). The examples are the pairs a
    fine-tune is scored on after training (empty for token files)."""
    if kind == "tokens":
        if dist.is_master:
            ensure_dataset(cfg.dataset)  # prepared once, by rank 0 (Shakespeare is prepared on first use)
        if dist.enabled:
            torch.distributed.barrier()  # the other ranks wait for it
        data_dir = check_token_files(ensure_dataset(cfg.dataset), cfg.vocab_size)  # whole ids < vocab
        train, val = (Batches(data_dir / f"{split}.bin", cfg.batch_size, cfg.block_size, seed, device, dist.rank,
                              dist.world_size) for split, seed in (("train", cfg.seed), ("val", cfg.seed + 1)))
        return train, val, []
    load, Rows = {"sft": (load_sft_splits, SFTBatches), "preferences": (load_preference_splits, PreferenceBatches)}[kind]
    train_examples, val_examples = load(cfg)
    train, val = (Rows(examples, cfg.batch_size, cfg.block_size, seed, device, dist.rank, dist.world_size)
                  for examples, seed in ((train_examples, cfg.seed), (val_examples, cfg.seed + 1)))
    return train, val, val_examples
