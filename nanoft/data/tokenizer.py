"""GPT-2's tokenizer: byte-level BPE through tiktoken, loaded offline whenever a copy is cached.

Byte-pair encoding (Sennrich et al., 2016, https://arxiv.org/abs/1508.07909) starts from single symbols
and repeatedly merges the most frequent adjacent pair into a new one; GPT-2 (Radford et al., 2019) runs it
on UTF-8 bytes, so any text encodes with no unknown token. Its vocabulary has 50,257 ids: 256 bytes, 50,000
learned merges, and `<|endoftext|>` (50256), which separates documents and ends every SFT response.
A text is first split by a regular expression into words, numbers and punctuation, each keeping its leading
space (so " word" and "word" are different tokens), and each piece is encoded on its own.

The ranks (merge order) are the file `gpt2.tiktoken`; get_tokenizer finds it online, in the cache, or inside
the openai-whisper source archive on PyPI (see get_tokenizer).
"""
from __future__ import annotations

import functools
import os
import tarfile
from pathlib import Path

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex, from tiktoken

from nanoft.data import tokens
from nanoft.data.download import pip_download

EOT = "<|endoftext|>"  # GPT-2's document separator
EOT_ID = 50256  # its id: ends every document and every SFT response

# The GPT-2 BPE ranks are also shipped inside the openai-whisper source archive on PyPI: a way to get them
# on machines that reach a package registry but not openaipublic.blob.core.windows.net.
WHISPER = "openai-whisper==20250625"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # whisper's copy


def load_tokenizer_file(path: Path) -> tiktoken.Encoding:
    """GPT-2's encoding built from a `gpt2.tiktoken` ranks file (the format tiktoken itself caches)."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=GPT2_TIKTOKEN_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: EOT_ID})


def _fetch_tokenizer_file(dest: Path) -> Path:
    sdist = pip_download(WHISPER, tokens.cache_dir() / "pip", "openai_whisper-*.tar.gz")
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        ranks = tar.extractfile(member).read()
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(ranks)
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
        except Exception as e:  # noqa: BLE001 (tiktoken raises whatever its HTTP client raises offline)
            errors.append(f"tiktoken.get_encoding('gpt2'): {type(e).__name__}")
    cached = tokens.cache_dir() / "gpt2.tiktoken"
    if not cached.exists() and not offline:
        try:
            _fetch_tokenizer_file(cached)
        except Exception as e:  # noqa: BLE001 (a network or archive failure of any kind: the next source is tried)
            errors.append(f"pip download {WHISPER}: {e}")
    if cached.exists():
        return load_tokenizer_file(cached)
    errors.append(f"no cached {cached}")
    raise RuntimeError(
        "could not load the GPT-2 tokenizer (" + "; ".join(errors) + "). Fix: go online once, or copy "
        f"gpt2.tiktoken (from the {WHISPER} sdist, whisper/assets/) to {cached}"
    )
