"""Preparing datasets: the user's own text files, and an HTTP corpus served from 127.0.0.1.

The HTTP tests run a real `http.server` on loopback that honours Range requests (or is told not to),
and can publish a checksum in an `X-Linked-Etag` header as Hugging Face does."""
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from nanoft.data import corpus, download, tokenizer, tokens

REPO = Path(__file__).resolve().parents[2]
REPO_CACHE = tokens.DATA_ROOT / ".cache"
DOCS = ["Once upon a time there was a cat.", "The cat sat on the mat.\nIt was happy.", "The end? Ünïcödé ✓"]
CORPUS = ("\n<|endoftext|>\n".join(DOCS * 40) + "\n").encode()


@pytest.fixture
def enc(monkeypatch):
    # load the tokenizer from the repo's cache before DATA_ROOT moves to tmp_path (it is cached in-process)
    monkeypatch.setenv("NANOFT_OFFLINE", "1")
    if not (REPO_CACHE / "gpt2.tiktoken").exists():
        pytest.fail(f"{REPO_CACHE / 'gpt2.tiktoken'} is missing: run `python data/prepare.py shakespeare` first")
    return tokenizer.get_tokenizer()


@pytest.fixture
def root(tmp_path, monkeypatch, enc):
    monkeypatch.setattr(tokens, "DATA_ROOT", tmp_path / "data")
    return tmp_path / "data"


def cli_env(root: Path) -> dict:
    """Environment for running data/prepare.py in a subprocess against `root`, offline."""
    (root / ".cache").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_CACHE / "gpt2.tiktoken", root / ".cache" / "gpt2.tiktoken")
    return {**os.environ, "NANOFT_DATA": str(root), "NANOFT_OFFLINE": "1"}


def decoded(enc, out: Path) -> str:
    ids = np.concatenate([tokens.read_tokens(out / "train.bin"), tokens.read_tokens(out / "val.bin")])
    return enc.decode(ids.tolist())


def test_prepare_text_files_roundtrip(tmp_path, root, enc):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "a.txt").write_text("First note.\nTwo lines.\n")
    (notes / "sub" / "b.txt").write_text("Second note<|endoftext|>third note, in the same file ✓")
    (notes / "c.md").write_text("not matched")
    out = corpus.prepare_text_files(str(notes / "**" / "*.txt"), "mytext", val_fraction=0.2)
    assert out == root / "mytext"
    assert decoded(enc, out) == "First note.\nTwo lines.<|endoftext|>Second note<|endoftext|>" \
                                "third note, in the same file ✓<|endoftext|>"
    n_val = len(tokens.read_tokens(out / "val.bin"))
    assert n_val == round((n_val + len(tokens.read_tokens(out / "train.bin"))) * 0.2)
    with pytest.raises(FileNotFoundError, match="no files match"):
        corpus.prepare_text_files(str(tmp_path / "nothing" / "*.txt"), "x")


def test_prepare_cli_text_files(tmp_path, enc):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("Hello world. " * 50)
    root = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, str(REPO / "data" / "prepare.py"), "--input", str(tmp_path / "notes" / "*.txt"),
         "--name", "mytext"], env=cli_env(root), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"wrote {root / 'mytext' / 'train.bin'}: " in result.stdout and "val unigram baseline" in result.stdout
    assert decoded(enc, root / "mytext") == ("Hello world. " * 50).strip() + "<|endoftext|>"


def test_prepare_cli_bad_input_is_one_line_naming_the_file(tmp_path):
    """A file that is not UTF-8 is named (a glob may match hundreds); --val-fraction=0 is refused, not
    silently replaced by the default."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("Hello world. " * 50)
    (tmp_path / "notes" / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    root = tmp_path / "data"
    cmd = [sys.executable, str(REPO / "data" / "prepare.py"), "--input", str(tmp_path / "notes" / "*.txt"), "--name", "x"]
    result = subprocess.run(cmd, env=cli_env(root), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'notes' / 'b.txt'} is not UTF-8 text (byte 3: unexpected " \
        "end of data); convert it, e.g. with iconv"
    (tmp_path / "notes" / "b.txt").unlink()
    result = subprocess.run(cmd + ["--val-fraction=0"], env=cli_env(root), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == "error: val_fraction must be in (0, 1), got 0.0"
    assert not (root / "x").exists()  # nothing half-written


@pytest.mark.parametrize("chunk_chars", [1, 7, 1000])
def test_tokenize_text_file_streams_across_chunk_boundaries(tmp_path, enc, chunk_chars):
    (tmp_path / "s.txt").write_bytes(CORPUS)
    n = corpus.tokenize_text_file(tmp_path / "s.txt", tmp_path / "s.bin", chunk_chars=chunk_chars)
    ids = tokens.read_tokens(tmp_path / "s.bin")
    assert n == len(ids) and enc.decode(ids.tolist()) == "".join(d + "<|endoftext|>" for d in DOCS * 40)


# ---------------------------------------------------------------------------------------------------
# HTTP

class Server:
    """A loopback HTTP server for one file, recording the Range header of every GET."""

    def __init__(self, payload: bytes, honour_range: bool = True, etag: str | None = None):
        self.payload, self.honour_range, self.etag = payload, honour_range, etag
        self.ranges: list[str | None] = []
        self.sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _headers(self, status, length, extra=()):
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                if outer.etag:
                    self.send_header("X-Linked-Etag", f'"{outer.etag}"')
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                self._headers(200, len(outer.payload))

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                body, status, extra = outer.payload, 200, []
                if rng and outer.honour_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self._headers(416, 0, [("Content-Range", f"bytes */{len(body)}")])
                        return
                    status, body = 206, body[start:]
                    extra = [("Content-Range", f"bytes {start}-{len(outer.payload) - 1}/{len(outer.payload)}")]
                self._headers(status, len(body), extra)
                outer.sent += len(body)  # before the write: the client may return before this thread runs again
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/corpus.txt"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*args, **kwargs):
        servers.append(Server(*args, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


SHA = hashlib.sha256(CORPUS).hexdigest()


def test_http_corpus_download_with_progress(root, enc, serve, capsys):
    server = serve(CORPUS)
    out = corpus.prepare_url("mini", url=server.url, sha256=SHA, val_fraction=0.1)
    assert (root / ".cache" / "mini" / "corpus.txt").read_bytes() == CORPUS
    assert decoded(enc, out) == "".join(d + "<|endoftext|>" for d in DOCS * 40)
    assert not (out / "all.bin").exists() and server.ranges == [None]
    err = capsys.readouterr().err
    assert "corpus.txt" in err and "100%" in err  # the tqdm progress bar


def test_http_resumes_partial_download_with_range(tmp_path, serve):
    server = serve(CORPUS)
    dest = tmp_path / "corpus.txt"
    (tmp_path / "corpus.txt.part").write_bytes(CORPUS[:1000])
    download.download(server.url, dest, SHA)
    assert server.ranges == ["bytes=1000-"] and server.sent == len(CORPUS) - 1000
    assert dest.read_bytes() == CORPUS and not (tmp_path / "corpus.txt.part").exists()


def test_http_part_already_complete_gets_416(tmp_path, serve):
    server = serve(CORPUS)
    (tmp_path / "corpus.txt.part").write_bytes(CORPUS)
    download.download(server.url, tmp_path / "corpus.txt", SHA)
    assert server.sent == 0 and (tmp_path / "corpus.txt").read_bytes() == CORPUS


def test_http_server_ignoring_range_restarts_cleanly(tmp_path, serve):
    server = serve(CORPUS, honour_range=False)
    (tmp_path / "corpus.txt.part").write_bytes(b"stale bytes from elsewhere")
    download.download(server.url, tmp_path / "corpus.txt", SHA)
    assert (tmp_path / "corpus.txt").read_bytes() == CORPUS


def test_http_checksum_mismatch_is_clear_and_deletes_nothing_good(root, serve):
    server = serve(CORPUS)
    tokens.write_tokens([1, 2, 3], root / "mini" / "train.bin")  # an earlier good preparation
    with pytest.raises(RuntimeError, match="sha256 mismatch") as err:
        corpus.prepare_url("mini", url=server.url, sha256="0" * 64)
    assert str(root / ".cache" / "mini" / "corpus.txt.bad") in str(err.value)
    assert (root / ".cache" / "mini" / "corpus.txt.bad").read_bytes() == CORPUS  # kept, not deleted
    assert not (root / ".cache" / "mini" / "corpus.txt").exists()
    assert tokens.read_tokens(root / "mini" / "train.bin").tolist() == [1, 2, 3]


def test_http_published_checksum_header_is_checked(root, serve):
    assert download.published_sha256(serve(CORPUS, etag=SHA).url) == SHA
    assert download.published_sha256(serve(CORPUS).url) is None
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        corpus.prepare_url("mini", url=serve(CORPUS, etag="1" * 64).url)


def test_prepare_cli_url(tmp_path, enc, serve):
    server = serve(CORPUS)
    root = tmp_path / "data"
    cmd = [sys.executable, str(REPO / "data" / "prepare.py"), "mini", "--url", server.url]
    result = subprocess.run(cmd + ["--sha256", SHA], env=cli_env(root), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "val.bin" in result.stdout and "val unigram baseline" in result.stdout
    assert decoded(enc, root / "mini") == "".join(d + "<|endoftext|>" for d in DOCS * 40)
    result = subprocess.run(cmd + ["--sha256", "f" * 64], env=cli_env(tmp_path / "other"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "error: sha256 mismatch" in result.stderr
