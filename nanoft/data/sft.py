"""Supervised fine-tuning data: prompt/response pairs, with the loss on the response tokens only.

Data is JSONL, one example a line: {"prompt": "Line: To be, or not to be\\nSpeaker:", "response": " HAMLET"}.
Each example becomes GPT-2 BPE ids `prompt + response + <|endoftext|>`; the loss mask is 1 on the targets
that are response tokens (and the closing <|endoftext|>, so the model learns to stop) and 0 on the prompt:
the model is taught to answer, not to write prompts.

    ids     Line : ␣To ␣be ... \n Speaker :  ␣HAM LET <eot>
    mask          0   0   0 ...  0    0    0   1    1    1        (mask[t] says whether y[t] = ids[t+1] counts)

Batching pads, it does not pack: one example per row, right-padded (with <|endoftext|> in x and -1 in y,
mask 0) to the longest row of the batch rounded up to a multiple of 8, never beyond block_size. Packing
several examples into one row would let each attend to the ones before it unless attention were masked
per document; padding keeps examples independent, and padding to the batch's longest row (rather than
to block_size) keeps its cost small for short examples like the speaker task's ~25 tokens.

Too long: an example whose prompt + response + <|endoftext|> exceeds block_size + 1 tokens keeps its whole
response and loses the start of its prompt (the end of a prompt, next to the answer, matters most);
if the response alone does not fit, the example is dropped, and the number dropped is printed.

The data is cfg.sft_data's JSONL, or, when that is empty, the embedded speaker task (nanoft/data/speaker_task.py):
load_sft_splits decides. What a fine-tuned model answers is measured in nanoft/objectives/sft_eval.py.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nanoft.config import Config
from nanoft.data.speaker_task import build_speaker_task, speaker_task_dir
from nanoft.data.tokenizer import EOT_ID, get_tokenizer
from nanoft.data.tokens import draw_seed

SPLIT_SEED = 0  # fixed, not cfg.seed: every run (full, lora, qlora, any seed) is scored on the same val set
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # ends with EOT_ID


# ----------------------------------------------------------------------------------------------------
# Reading and tokenising

def read_jsonl(path: str | Path, keys: tuple[str, ...], what: str) -> list[dict]:
    """The objects of a JSONL file, one a line (blank lines skipped), each with the string fields `keys` (only
    those kept). Anything else is a ValueError naming the file and line number; so is a file with none."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            names = ", ".join(f'"{k}"' for k in keys[:-1]) + f' and "{keys[-1]}"'  # '"a", "b" and "c"'
            if not isinstance(obj, dict) or not set(keys) <= obj.keys():
                raise ValueError(f"{path} line {n}: expected an object with string {names}, got {line.strip()[:80]!r}")
            if not all(isinstance(obj[k], str) for k in keys):
                raise ValueError(f"{path} line {n}: {names} must be strings")
            rows.append((n, {k: obj[k] for k in keys}))
    if not rows:
        raise ValueError(f"{path} holds no {what}")
    return rows


def load_sft_jsonl(path: str | Path) -> list[dict]:
    """[{"prompt": str, "response": str}, ...] from a JSONL file (read_jsonl's rules); an empty response is a
    ValueError naming the line: it leaves nothing to learn."""
    examples = []
    for n, obj in read_jsonl(path, ("prompt", "response"), "examples"):
        if not obj["response"]:
            raise ValueError(f'{path} line {n}: empty "response" leaves nothing to learn')
        examples.append(obj)
    return examples


def write_sft_jsonl(examples: list[dict], path: str | Path) -> Path:
    """Write examples as JSONL atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: data-parallel ranks may race
    tmp.write_text("".join(json.dumps({"prompt": e["prompt"], "response": e["response"]}) + "\n" for e in examples))
    os.replace(tmp, path)
    return path


def tokenize_examples(examples: list[dict]) -> list[SFTExample]:
    """Prompt and response are encoded separately, so the mask boundary falls exactly between them
    (GPT-2's pre-tokenizer splits before " word" anyway, so this is also how the joined text encodes).
    "<|endoftext|>" written inside a text stays text: only the EOT we append is the special token."""
    enc = get_tokenizer()
    prompts = enc.encode_ordinary_batch([e["prompt"] for e in examples])
    responses = enc.encode_ordinary_batch([e["response"] for e in examples])
    return [SFTExample(e["prompt"], e["response"], tuple(p), tuple(r) + (EOT_ID,))
            for e, p, r in zip(examples, prompts, responses)]


def fit_to_block(ex: SFTExample, block_size: int) -> tuple[list[int], int] | None:
    """(ids, n_prompt) with len(ids) <= block_size + 1 (x and y are ids[:-1] and ids[1:]); the prompt
    loses tokens from its start when needed; None when the response alone is too long."""
    room = block_size + 1 - len(ex.response_ids)
    if room < 1:  # not even one prompt token: nothing to condition the first response token on
        return None
    prompt = list(ex.prompt_ids[-room:]) if ex.prompt_ids else []
    if not prompt:  # an empty prompt still needs a token to predict the response's first token from
        prompt = [EOT_ID]
    return prompt + list(ex.response_ids), len(prompt)


def split_examples(examples: list, seed: int = SPLIT_SEED, val_fraction: float = VAL_FRACTION) -> tuple[list, list]:
    """A seeded shuffle, then the first 90% train and the last 10% val (at least one of each)."""
    if len(examples) < 2:
        raise ValueError(f"need at least 2 examples to split into train and val, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * val_fraction)))
    return [examples[i] for i in order[:-n_val]], [examples[i] for i in order[-n_val:]]


# ----------------------------------------------------------------------------------------------------
# Batches

class SFTBatches:
    """(x, y, loss_mask) batches of padded examples, with nanoft.data.tokens.Batches' contract.

    Examples are visited in epochs: epoch e is a permutation of all examples seeded with (seed, e), and
    batch i takes positions [i*B*W, (i+1)*B*W) of the concatenated epochs (W = world_size), of which rank
    r keeps [r*B, (r+1)*B). So batch i depends on (seed, i) only: resuming at `position` k reproduces an
    uninterrupted run, and every example is seen once per epoch."""

    def __init__(self, examples_tokens: list[SFTExample], batch_size: int, block_size: int, seed: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        fitted = [fit_to_block(ex, block_size) for ex in examples_tokens]
        self.rows = [f for f in fitted if f is not None]
        dropped = len(fitted) - len(self.rows)
        if dropped and rank == 0:
            print(f"sft: dropped {dropped} of {len(fitted)} examples whose response does not fit block_size={block_size}")
        if not self.rows:
            raise ValueError(f"no example fits block_size={block_size}")
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.position = 0  # batches drawn so far
        self._orders: dict[int, list[int]] = {}  # epoch -> permutation of the rows

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if len(self._orders) > 2:  # a batch spans at most two epochs: keep the cache small
                self._orders.pop(min(self._orders))
            g = torch.Generator().manual_seed(draw_seed(self.seed, epoch))
            self._orders[epoch] = torch.randperm(len(self.rows), generator=g).tolist()
        return self._orders[epoch]

    def indices(self, i: int) -> list[int]:
        """Which examples make up this rank's rows of batch i."""
        B, n = self.batch_size, len(self.rows)
        start = i * B * self.world_size + self.rank * B
        return [self._epoch_order(k // n)[k % n] for k in range(start, start + B)]

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        rows = [self.rows[j] for j in self.indices(self.position)]
        self.position += 1
        x, y, mask = collate(rows, self.block_size)
        if self.device.type == "cuda":  # pinned memory: the copy overlaps with the GPU's work
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in (x, y, mask))
        return x.to(self.device), y.to(self.device), mask.to(self.device)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def collate(rows: list[tuple[list[int], int]], block_size: int, multiple: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, n_prompt) rows -> x, y, loss_mask, each (B, T) with T the longest row rounded up to `multiple`
    (fewer distinct shapes for torch.compile and the allocator), at most block_size."""
    longest = max(len(ids) - 1 for ids, _ in rows)
    T = min(block_size, -(-longest // multiple) * multiple)
    x = torch.full((len(rows), T), EOT_ID, dtype=torch.long)  # pad value is irrelevant: masked out
    y = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: ignored by the loss even without a mask
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(rows):
        L = len(ids) - 1
        x[b, :L] = torch.tensor(ids[:-1])
        y[b, :L] = torch.tensor(ids[1:])
        mask[b, n_prompt - 1:L] = 1  # y[t] = ids[t+1]: targets from the first response token on
    return x, y, mask


# ----------------------------------------------------------------------------------------------------
# The run's examples

def load_sft_splits(cfg: Config) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, val) tokenised examples: cfg.sft_data's JSONL split 90/10 with a fixed seed, or, when
    cfg.sft_data is empty, the embedded speaker task, whose split is also written as JSONL under
    DATA_ROOT/speaker_task/ for reading (and for reuse through sft_data)."""
    if cfg.sft_data:
        if not Path(cfg.sft_data).is_file():
            raise FileNotFoundError(f"sft_data file not found: {cfg.sft_data}")
        train, val = split_examples(load_sft_jsonl(cfg.sft_data))
    else:
        train, val = split_examples(build_speaker_task())
        write_sft_jsonl(train, speaker_task_dir() / "train.jsonl")
        write_sft_jsonl(val, speaker_task_dir() / "val.jsonl")
    return tokenize_examples(train), tokenize_examples(val)
