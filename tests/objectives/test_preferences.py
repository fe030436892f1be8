"""DPO and the reward model: their losses against float64 transcriptions of the papers' formulas, the chunked
log-probabilities against the plain log-softmax, the reference (adapters off; a frozen copy for full weights),
learning on real pairs, the preference data and its errors, a DPO run of train.py, a reward model saved and loaded."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

import train  # the repository's scripts: run here, in this process
from nanoft.config import Config
from nanoft.data.preferences import PreferenceBatches, PreferencePair, load_preference_jsonl
from nanoft.data.sft import SFTExample, collate, fit_to_block
from nanoft.model.gpt import GPT
from nanoft.model.logprobs import sequence_logprobs
from nanoft.objectives.dpo import DPO, FrozenReference, dpo_loss
from nanoft.objectives.reward import RewardModel, bradley_terry_loss, rewards
from nanoft.peft.lora_model import apply_lora
from nanoft.run import checkpoint
from nanoft.run.resume import check_resume
from nanoft.tools.memory.estimate import Run, static_bytes
from nanoft.tools.memory.shape import ModelShape
from nanoft.tools.reward import load_reward_model
from nanoft.tools.reward import main as reward_main
from sample import load_model

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0, device="cpu", dtype="float32")


def random_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return tuple(torch.randint(0, 1000, (k,), generator=g).tolist())

    pairs = []
    for _ in range(n):
        prompt = ids(int(torch.randint(1, 6, (1,), generator=g)))
        pairs.append(PreferencePair(SFTExample("", "", prompt, ids(int(torch.randint(1, 6, (1,), generator=g)))),
                                    SFTExample("", "", prompt, ids(int(torch.randint(1, 6, (1,), generator=g))))))
    return pairs


def batch_of(pairs, block_size=16, vocab_size=50304):
    x, y, mask = collate([fit_to_block(p.chosen, block_size) for p in pairs] +
                         [fit_to_block(p.rejected, block_size) for p in pairs], block_size)
    return x.clamp(max=vocab_size - 1), y, mask  # the padding (<eot>, masked out) inside a small vocabulary


def test_dpo_loss_equals_the_papers_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    logps = [torch.randn(64, generator=g, dtype=torch.float64) * 20 - 40 for _ in range(4)]
    for beta in (0.1, 0.5, 3.0):
        loss, chosen, rejected = dpo_loss(*(t.float() for t in logps), beta=beta)
        pw, pl, rw, rl = (t.tolist() for t in logps)
        per_pair = [-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d))))) for a, b, c, d in zip(pw, pl, rw, rl)]
        assert loss.item() == pytest.approx(sum(per_pair) / len(per_pair), rel=1e-5, abs=1e-6)
        assert torch.allclose(chosen.double(), beta * (logps[0] - logps[2]), rtol=1e-5, atol=1e-5)
        assert torch.allclose(rejected.double(), beta * (logps[1] - logps[3]), rtol=1e-5, atol=1e-5)
    # a huge margin neither overflows nor loses the sign: logsigmoid, not log(sigmoid)
    big = dpo_loss(torch.tensor([0.0]), torch.tensor([2000.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)[0]
    assert big.item() == pytest.approx(2000.0)


def test_bradley_terry_loss_equals_its_formula_in_float64():
    r = torch.randn(2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4
    expected = sum(-math.log(1 / (1 + math.exp(-(w - l)))) for w, l in zip(*r.tolist())) / 32
    assert bradley_terry_loss(r[0].float(), r[1].float()).item() == pytest.approx(expected, rel=1e-5)


def test_chunked_sequence_logprobs_equal_the_plain_log_softmax_values_and_gradients(one_thread):
    torch.manual_seed(0)
    model = GPT(Config(**{**SMALL, "vocab_size": 1024})).double()
    x, y, mask = batch_of(random_pairs(5), vocab_size=1024)
    weights = torch.randn(x.size(0), dtype=torch.float64)
    got = sequence_logprobs(model, x, y, mask, chunk_rows=3)  # several chunks, one of them short
    (got.double() * weights).sum().backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model.lm_head(model.hidden_states(x))  # (R, T, V): the plain path, whole
    logp = torch.log_softmax(logits, dim=-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    expected = (logp * mask).sum(dim=1)
    (expected * weights).sum().backward()
    assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    for a, p in zip(got_grads, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-10, atol=1e-14)


def test_lora_reference_is_the_base_with_adapters_off_and_the_policy_is_restored():
    torch.manual_seed(0)
    cfg = Config(**SMALL, finetune="dpo", finetune_weights="lora", lora_train_norms=True, lora_dropout=0.1)
    base = GPT(cfg)
    model = apply_lora(copy.deepcopy(base), cfg)  # the same base weights under the adapters
    x, y, mask = batch_of(random_pairs(4))
    reference = FrozenReference(model, "cpu")
    with torch.no_grad():  # the policy moves away: adapters nonzero, a trained norm changed
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    ref = reference.sequence_logprobs(model, x, y, mask)
    assert torch.equal(ref, sequence_logprobs(base.eval(), x, y, mask))  # bit for bit: the starting model
    assert model.training and all(torch.equal(p, moved[n]) for n, p in model.named_parameters())
    assert not torch.allclose(sequence_logprobs(model.eval(), x, y, mask), ref)  # and the policy is not it
    assert sum(p.numel() for p in reference.start.values()) == 3 * 2 * 16  # only the 3 norms kept aside, no copy


def test_full_weights_reference_is_a_frozen_copy():
    torch.manual_seed(0)
    model = GPT(Config(**SMALL))
    reference = FrozenReference(model, "cpu")
    assert not any(p.requires_grad for p in reference.copy.parameters()) and not reference.copy.training
    x, y, mask = batch_of(random_pairs(3))
    before = reference.sequence_logprobs(model, x, y, mask)
    with torch.no_grad():
        model.wte.weight.mul_(2)
    assert torch.equal(reference.sequence_logprobs(model, x, y, mask), before)


def test_dpo_training_orders_every_pair_and_the_reward_model_learns_them(one_thread):
    torch.manual_seed(0)
    pairs = random_pairs(8, seed=3)
    batch = batch_of(pairs)
    model = GPT(Config(**SMALL))
    dpo = DPO(Config(**SMALL, finetune="dpo", dpo_beta=0.5), model, "cpu")
    before = dpo.preference_accuracy(model, pairs, "cpu", reference=True)
    assert dpo.preference_accuracy(model, pairs, "cpu") == before < 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    assert dpo(model, batch).item() == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: every reward 0
    for _ in range(12):
        dpo(model, batch).backward()
        opt.step()
        opt.zero_grad()
    dpo.pop_scores("train_")
    assert dpo(model, batch).item() < 0.3
    scores = dpo.pop_scores("train_")
    assert scores["train_reward_accuracy"] == 1.0 and scores["train_reward_margin"] > 1
    assert dpo.preference_accuracy(model, pairs, "cpu") > before  # the model itself now prefers more chosen ones
    assert dpo.preference_accuracy(model, pairs, "cpu", reference=True) == before  # and the reference stayed

    model = GPT(Config(**SMALL))
    rm = RewardModel(Config(**SMALL, finetune="reward"), model, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    assert rm(model, batch).item() == pytest.approx(math.log(2))  # a zero head: every pair ties
    for _ in range(12):
        rm(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert rm.pairwise_accuracy(model, pairs, "cpu") == 1.0


def test_reward_is_read_at_the_last_response_token():
    torch.manual_seed(0)
    model = GPT(Config(**SMALL))
    RewardModel(Config(**SMALL, finetune="reward"), model, "cpu")
    torch.nn.init.normal_(model.reward_head.weight)
    pairs = random_pairs(3)
    x, _, mask = batch_of(pairs)
    got = rewards(model, x, mask)
    for row, ex in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
        ids = list(ex.prompt_ids + ex.response_ids)[:-1]  # x: all but the last id (the <eot> target)
        alone = model.reward_head(model.hidden_states(torch.tensor([ids]))[0, -1])
        assert got[row].item() == pytest.approx(alone.item(), abs=1e-5)


def test_preference_batches_put_each_pairs_rows_b_apart_and_resume_exactly():
    pairs = random_pairs(10)
    batches = PreferenceBatches(pairs, batch_size=3, block_size=16, seed=1)
    batches.next()
    state = batches.state_dict()
    x, y, mask = batches.next()
    picked = batches.indices(1)
    for i, j in enumerate(picked):  # row i and 3 + i: the same pair's chosen and rejected
        assert tuple(x[i, :len(pairs[j].chosen.prompt_ids)].tolist()) == pairs[j].chosen.prompt_ids
        assert tuple(x[3 + i, :len(pairs[j].rejected.prompt_ids)].tolist()) == pairs[j].rejected.prompt_ids
    again = PreferenceBatches(pairs, batch_size=3, block_size=16, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.next(), (x, y, mask)))


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"}', 'line 2: expected an object with string "prompt", "chosen" and "rejected"'),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', 'line 2: empty "chosen" or "rejected"'),
    ("not json", "line 2: not valid JSON"),
])
def test_bad_preference_lines_are_named(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_preference_jsonl(path)


def save_base(path, cfg):
    torch.manual_seed(0)
    checkpoint.save(path, checkpoint.Checkpoint(step=1, config=cfg.to_dict(), model=GPT(cfg).state_dict()))


def test_train_dpo_with_lora_saves_the_adapter_that_sample_py_applies(tmp_path, capsys, monkeypatch):
    """train.py's main (in this process: no second interpreter start-up) on a small JSONL: logs the rewards, saves
    only the adapter, and sample.py's loader applies it to its base."""
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"ROMEO:\nLine {i}\n", "chosen": "O, she doth teach the torches\n",
                                        "rejected": "Wherefore art thou\n"}) + "\n" for i in range(20)))
    save_base(tmp_path / "base", Config(**{**SMALL, "block_size": 32}))
    monkeypatch.chdir(ROOT)
    train.main(["configs/dpo.py", f"--out_dir={tmp_path / 'dpo'}", "--n_layer=1", "--n_head=2", "--n_embd=16",
                "--block_size=32", "--batch_size=4", "--eval_iters=1", "--warmup_iters=0", "--max_iters=2",
                "--eval_interval=2", "--save_interval=2", "--dtype=float32", f"--init_from={tmp_path / 'base'}",
                f"--preference_data={data}"])
    assert "held-out preference accuracy" in capsys.readouterr().out
    record = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_reward_accuracy", "train_reward_margin", "val_reward_accuracy", "val_loss"} <= set(record)
    saved = checkpoint.load(tmp_path / "dpo").model
    assert saved and all("lora_" in k for k in saved)  # the adapter only
    model = load_model(str(tmp_path / "dpo"))
    assert {n for n, _ in model.named_parameters() if "lora_" in n} == set(saved)
    assert all(torch.equal(dict(model.named_parameters())[k], v) for k, v in saved.items())


def test_a_saved_reward_model_loads_with_its_head_and_scores(tmp_path, capsys):
    cfg = Config(**SMALL, finetune="reward")
    model = GPT(cfg)
    RewardModel(cfg, model, "cpu")
    torch.nn.init.normal_(model.reward_head.weight)
    checkpoint.save(tmp_path / "rm", checkpoint.Checkpoint(step=1, config=cfg.to_dict(), model=model.state_dict()))
    loaded = load_reward_model(str(tmp_path / "rm"))
    assert torch.equal(loaded.reward_head.weight, model.reward_head.weight)
    reward_main([str(tmp_path / "rm"), "--prompt=ROMEO:\n", "--response=Wherefore\n", "--response=O, she\n"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("'Wherefore\\n'")
    with pytest.raises(ValueError, match="is a reward model: it scores text"):
        load_model(str(tmp_path / "rm"))


@pytest.mark.parametrize("key, saved, now", [("finetune_weights", "lora", "full"),
                                             ("preference_data", "a.jsonl", "b.jsonl")])
def test_resume_refuses_other_weights_or_other_pairs(tmp_path, key, saved, now):
    resume = checkpoint.Checkpoint(step=1, config=Config(finetune="dpo", **{key: saved}).to_dict(), model={})
    with pytest.raises(checkpoint.CheckpointError, match=key):
        check_resume(resume, Config(finetune="dpo", out_dir=str(tmp_path), **{key: now}))


def test_memory_estimate_knows_dpo_and_the_reward_head():
    shape = ModelShape.from_config(Config(**SMALL))
    full = static_bytes(shape, Run.from_config(Config(**SMALL, finetune="full")))
    dpo_full = static_bytes(shape, Run.from_config(Config(**SMALL, finetune="dpo")))
    assert dpo_full["frozen_model"] == full["params"] and dpo_full["n_trainable"] == full["n_trainable"]
    dpo_lora = static_bytes(shape, Run.from_config(Config(**SMALL, finetune="dpo", finetune_weights="lora")))
    lora = static_bytes(shape, Run.from_config(Config(**SMALL, finetune="lora")))
    assert dpo_lora["frozen_model"] == 0 and dpo_lora["n_trainable"] == lora["n_trainable"]  # adapters off: no copy
    reward = static_bytes(shape, Run.from_config(Config(**SMALL, finetune="reward")))
    model = GPT(Config(**SMALL))
    RewardModel(Config(**SMALL, finetune="reward"), model, "cpu")
    assert reward["n_trainable"] == full["n_trainable"] + 16 + 1 == sum(p.numel() for p in model.parameters())
