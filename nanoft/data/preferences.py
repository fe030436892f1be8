"""Preference data: a prompt with a chosen and a rejected response, for DPO (nanoft/objectives/dpo.py) and the reward
model (nanoft/objectives/reward.py).

Data is JSONL, one pair a line: {"prompt": "...", "chosen": "...", "rejected": "..."}. Each pair becomes two
SFT rows (nanoft/data/sft.py: prompt + response + <|endoftext|>, the loss mask on the response), and a batch of B
pairs is 2B rows: the B chosen first, then the B rejected in the same order, so row i and row B + i share a
prompt. Pairs visit in epochs exactly as SFTBatches' examples do (batch i depends on (seed, i) only, so resume
is exact); a pair is dropped when either response alone does not fit block_size.

The embedded default needs nothing beyond the plays the data module caches: a speech's opening is the prompt
(its speaker and first one or two lines, written as the plays are: "HAMLET:\\nTo be, or not to be...\\n"), its
true next line is chosen, and the next line of another speech, of the same length in tokens, is rejected, so a
model cannot prefer the chosen one for being shorter (a sum of log-probabilities favours short responses).
The preferred behaviour is "continue this speech", which a language model of the plays half knows already:
DPO should sharpen it, and the held-out accuracy is measured before and after.
"""
from __future__ import annotations

import itertools
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nanoft.config import Config
from nanoft.data.sft import (
    SPLIT_SEED,
    SFTBatches,
    SFTExample,
    collate,
    fit_to_block,
    read_jsonl,
    split_examples,
    tokenize_examples,
)
from nanoft.data.shakespeare import all_speaker_lines
from nanoft.data.tokenizer import get_tokenizer

N_PAIRS = 3000  # pairs in the embedded set (90% train, 10% held out)
PROMPT_LINES = 2  # lines of the speech in the prompt, at most (a speech must have one more)


@dataclass(frozen=True)
class PreferencePair:
    chosen: SFTExample  # prompt + chosen response
    rejected: SFTExample  # the same prompt + rejected response


def load_preference_jsonl(path: str | Path) -> list[dict]:
    """[{"prompt", "chosen", "rejected"}, ...] from JSONL (nanoft.data.sft.read_jsonl's rules); an empty response is a
    ValueError naming the line."""
    pairs = []
    for n, obj in read_jsonl(path, ("prompt", "chosen", "rejected"), "preference pairs"):
        if not obj["chosen"] or not obj["rejected"]:
            raise ValueError(f'{path} line {n}: empty "chosen" or "rejected" response')
        pairs.append(obj)
    return pairs


def build_play_preferences(n_pairs: int = N_PAIRS) -> list[dict]:
    """The embedded set (see the module docstring): deterministic, offline once the plays are cached."""
    lines = all_speaker_lines()
    speeches = [(speaker, [line for *_, line in group])
                for (_, speaker), group in itertools.groupby(lines, key=lambda t: t[:2])]
    speeches = [s for s in speeches if len(s[1]) >= 2]
    rng = random.Random(SPLIT_SEED)
    picked = rng.sample(speeches, min(n_pairs, len(speeches)))
    k = [min(PROMPT_LINES, len(ls) - 1) for _, ls in picked]
    continuations = [ls[n] + "\n" for (_, ls), n in zip(picked, k)]
    lengths = [len(ids) for ids in get_tokenizer().encode_ordinary_batch(continuations)]
    by_length = defaultdict(list)  # tokens -> indices of the continuations that long
    for i, n_tokens in enumerate(lengths):
        by_length[n_tokens].append(i)
    pairs = []
    for i, ((speaker, ls), n) in enumerate(zip(picked, k)):
        others = next(others for group in _nearest_lengths(by_length, lengths[i])
                      if (others := [j for j in group if continuations[j] != continuations[i]]))
        j = rng.choice(others)
        prompt = f"{speaker}:\n" + "".join(line + "\n" for line in ls[:n])
        pairs.append({"prompt": prompt, "chosen": continuations[i], "rejected": continuations[j]})
    return pairs


def _nearest_lengths(by_length: dict[int, list[int]], length: int):
    """The groups of by_length from the given length outwards (length, length+1, length-1, ...)."""
    for d in range(max(by_length) + length):
        for n in (length + d, length - d) if d else (length,):
            if n in by_length:
                yield by_length[n]


def tokenize_pairs(pairs: list[dict]) -> list[PreferencePair]:
    chosen = tokenize_examples([{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs])
    rejected = tokenize_examples([{"prompt": p["prompt"], "response": p["rejected"]} for p in pairs])
    return [PreferencePair(c, r) for c, r in zip(chosen, rejected)]


def load_preference_splits(cfg: Config) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, val) tokenised pairs: cfg.preference_data's JSONL, or the embedded plays set; 90/10, fixed seed."""
    if cfg.preference_data:
        if not Path(cfg.preference_data).is_file():
            raise FileNotFoundError(f"preference_data file not found: {cfg.preference_data}")
        pairs = load_preference_jsonl(cfg.preference_data)
    else:
        pairs = build_play_preferences()
    train, val = split_examples(pairs)
    return tokenize_pairs(train), tokenize_pairs(val)


class PreferenceBatches(SFTBatches):
    """(x, y, loss_mask) of 2B rows per batch: B pairs' chosen rows, then their rejected rows (same order).
    SFTBatches orders the pairs (through their chosen rows); the rejected rows ride along by index."""

    def __init__(self, pairs: list[PreferencePair], batch_size: int, block_size: int, seed: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
        kept = fitting(pairs, block_size)
        if len(kept) < len(pairs) and rank == 0:
            print(f"preferences: dropped {len(pairs) - len(kept)} of {len(pairs)} pairs whose responses do not fit "
                  f"block_size={block_size}")
        if not kept:
            raise ValueError(f"no preference pair fits block_size={block_size}")
        super().__init__([p.chosen for p in kept], batch_size, block_size, seed, device, rank, world_size)
        self.rejected_rows = [fit_to_block(p.rejected, block_size) for p in kept]

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        picked = self.indices(self.position)
        self.position += 1
        rows = [self.rows[j] for j in picked] + [self.rejected_rows[j] for j in picked]
        return tuple(t.to(self.device) for t in collate(rows, self.block_size))


def fitting(pairs: list[PreferencePair], block_size: int) -> list[PreferencePair]:
    """The pairs whose chosen and rejected rows both fit block_size (a prompt may lose its start)."""
    return [p for p in pairs if fit_to_block(p.chosen, block_size) and fit_to_block(p.rejected, block_size)]


def pair_rows(pairs: list[PreferencePair], block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs (each fitting: see `fitting`) as one batch, chosen rows then rejected rows: for scoring a split."""
    return collate([fit_to_block(p.chosen, block_size) for p in pairs] +
                   [fit_to_block(p.rejected, block_size) for p in pairs], block_size)
