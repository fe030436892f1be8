"""Token files and batches: the data half of training.

A prepared dataset is a folder `DATA_ROOT/<name>/` holding `train.bin` and `val.bin`: GPT-2 BPE token ids
(nanoft/data/tokenizer.py) as raw little-endian uint16 (the vocabulary has 50257 entries, which fit in 16 bits),
as in nanoGPT. Documents are separated by GPT-2's `<|endoftext|>` token (50256), as GPT-2 itself was trained.
nanoft/data/corpus.py makes them (python data/prepare.py ...).

`Batches` samples random windows from a token file. Batch number i is a pure function of (seed, i), so a
run resumed at position k sees exactly the batches an uninterrupted run would have seen, and rank r of a
data-parallel run takes its slice of the batch a single process with world_size times the batch would draw.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATA_ROOT = Path(os.environ.get("NANOFT_DATA", Path(__file__).resolve().parents[2] / "data"))


def cache_dir() -> Path:
    """Where downloads and the tokenizer file are kept. DATA_ROOT is read at call time, here and in every
    module that uses it, so tests (and notebooks) can point it elsewhere after import."""
    return DATA_ROOT / ".cache"


# ----------------------------------------------------------------------------------------------------
# Token files

def write_tokens(ids: np.ndarray | list[int], path: Path) -> None:
    """Write token ids as a uint16 .bin file, atomically: a crash leaves the old file or none, never half."""
    arr = np.asarray(ids)
    if arr.size and (arr.min() < 0 or arr.max() >= 2**16):
        raise ValueError(f"token ids must be in [0, 65536) to fit uint16, got [{arr.min()}, {arr.max()}]")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        arr.astype(np.uint16).tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_tokens(path: Path) -> np.ndarray:
    """A token file as a read-only uint16 memmap (nothing is read until it is indexed)."""
    if Path(path).stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)  # mmap cannot map an empty file
    return np.memmap(path, dtype=np.uint16, mode="r")


def unigram_entropy(path: Path) -> float:
    """Cross-entropy, in nats per token, of a file's tokens under their own unigram distribution.

    This is the loss of a model that ignores context and predicts each token's overall frequency:
    the baseline a language model must beat to have learned anything from context."""
    counts = np.bincount(read_tokens(path))
    n = counts.sum()
    if n == 0:
        raise ValueError(f"{path} holds no tokens")
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------------------------------
# Batches

def draw_seed(seed: int, i: int) -> int:
    """The generator seed of draw i (a batch of Batches, an epoch of SFTBatches) of a run seeded `seed`:
    a pure function of (seed, i), which is what makes a resumed run draw what an uninterrupted one would.
    The prime stride keeps runs with different seeds apart for the first 1,000,003 draws."""
    return seed * 1_000_003 + i


class Batches:
    """Random (x, y) windows from a token file; y is x shifted by one token.

    Batch i draws `batch_size * world_size` offsets from a generator seeded with (seed, i), and rank r
    keeps rows [r*batch_size, (r+1)*batch_size). So batches depend on (seed, position) only: resuming at
    position k reproduces an uninterrupted run, and two ranks of B rows see one process's batch of 2B."""

    def __init__(self, path: Path, batch_size: int, block_size: int, seed: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.path = Path(path)
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # batches drawn so far
        n = len(read_tokens(self.path))
        if n < block_size + 1:
            raise ValueError(f"{self.path} holds {n} tokens, fewer than block_size + 1 = {block_size + 1}")

    def next(self) -> tuple[Tensor, Tensor]:
        B, T = self.batch_size, self.block_size
        # re-open the memmap every batch: a long-lived memmap keeps every page it touched resident,
        # which looks like a memory leak on a big file (nanoGPT does the same)
        data = read_tokens(self.path)
        g = torch.Generator().manual_seed(draw_seed(self.seed, self.position))
        ix = torch.randint(len(data) - T, (B * self.world_size,), generator=g)
        ix = ix[self.rank * B:(self.rank + 1) * B]  # this rank's rows
        x = torch.from_numpy(np.stack([data[i:i + T] for i in ix.tolist()]).astype(np.int64))  # (B, T)
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T] for i in ix.tolist()]).astype(np.int64))
        self.position += 1
        if self.device.type == "cuda":
            # pinned memory lets the copy run asynchronously, overlapping with the GPU's work
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
            return x, y
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def check_token_files(data_dir: Path, vocab_size: int) -> Path:
    """Each .bin holds whole uint16 ids below vocab_size; otherwise one line naming the file. Reads the
    files once (a few seconds per GB), much cheaper than an index error or a CUDA assert mid-run."""
    for name in ("train.bin", "val.bin"):
        path = Path(data_dir) / name
        size = path.stat().st_size
        if size % 2:
            raise ValueError(f"{path} has {size} bytes, an odd number: not a file of uint16 token ids "
                             "(truncated or not written by data/prepare.py)")
        if size:
            top = int(np.memmap(path, dtype=np.uint16, mode="r").max())
            if top >= vocab_size:
                raise ValueError(f"{path} holds token id {top}, beyond vocab_size={vocab_size} (another "
                                 "tokenizer's data?)")
    return Path(data_dir)
