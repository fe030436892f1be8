"""PPO and GRPO: each formula against a float64 transcription of the paper's (GAE's written-out recursion, the clipped
losses, the KL estimators, group normalisation, the KL controller); the objectives on a real small GPT (policy =
reference: KL 0 and a first ratio of exactly 1; a large step clips); rollouts that stop; train.py runs that resume."""
import json
import math
import random

import pytest
import torch

import train
from nanoft.config import Config, ConfigError
from nanoft.data.preferences import PreferenceBatches, PreferencePair
from nanoft.data.sft import SFTExample
from nanoft.data.tokenizer import EOT_ID, get_tokenizer
from nanoft.model.gpt import GPT
from nanoft.objectives import METHODS, method_of
from nanoft.objectives.grpo import GRPO
from nanoft.objectives.ppo import PPO
from nanoft.objectives.reward import add_reward_head
from nanoft.objectives.rl_math import (
    adaptive_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_k1,
    kl_k3,
    token_rewards,
    whiten,
)
from nanoft.objectives.rollout import sample, stop_ids
from nanoft.peft.lora_model import apply_lora
from nanoft.run import checkpoint
from nanoft.tools.memory.estimate import Run, static_bytes
from nanoft.tools.memory.shape import ModelShape
from sample import load_model

SMALL = dict(n_layer=1, n_head=2, n_embd=16, block_size=64, dropout=0.0, device="cpu", dtype="float32")


def random_pairs(n: int) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(0)

    def ids(k):
        return tuple(torch.randint(0, 1000, (k,), generator=g).tolist())

    return [PreferencePair(SFTExample("", "", prompt, ids(3) + (EOT_ID,)), SFTExample("", "", prompt, ids(2) + (EOT_ID,)))
            for prompt in (ids(int(torch.randint(2, 6, (1,), generator=g))) for _ in range(n))]


def random_rows(R=5, T=9, seed=0):
    """Padded rows whose masks are one contiguous run each, as rollouts' are."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(R, T, dtype=torch.float64)
    for r in range(R):
        start = int(torch.randint(0, 4, (1,), generator=g))
        mask[r, start:start + int(torch.randint(1, T - start + 1, (1,), generator=g))] = 1
    return g, mask


def test_gae_equals_the_written_out_recursion_in_float64():
    g, mask = random_rows()
    rewards, values = (torch.randn(mask.shape, generator=g, dtype=torch.float64) for _ in range(2))
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)):
        adv, ret = gae(rewards * mask, values * mask, mask, gamma, lam)
        for r in range(mask.size(0)):
            ts = mask[r].nonzero().flatten().tolist()
            rw, v = [rewards[r, t].item() for t in ts], [values[r, t].item() for t in ts]
            expect, running = [0.0] * len(ts), 0.0
            for i in reversed(range(len(ts))):  # delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}
                v_next = v[i + 1] if i + 1 < len(ts) else 0.0
                running = rw[i] + gamma * v_next - v[i] + gamma * lam * running
                expect[i] = running
            assert adv[r, ts].tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)
            assert ret[r, ts].tolist() == pytest.approx([a + b for a, b in zip(expect, v)], rel=1e-12, abs=1e-12)
        assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    # lambda = 1, gamma = 1: the advantage is the reward-to-go minus the value (Monte Carlo)
    adv, _ = gae(rewards * mask, values * mask, mask, 1.0, 1.0)
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-12)


def test_token_rewards_put_the_score_on_the_last_response_token():
    g, mask = random_rows()
    kl = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    scores = torch.randn(mask.size(0), generator=g, dtype=torch.float64)
    r = token_rewards(kl, scores, mask, 0.1)
    for row in range(mask.size(0)):
        ts = mask[row].nonzero().flatten().tolist()
        expect = [-0.1 * kl[row, t].item() + (scores[row].item() if t == ts[-1] else 0.0) for t in ts]
        assert r[row, ts].tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)


def test_whiten_gives_mean_zero_and_unit_bessel_variance_over_the_mask():
    g, mask = random_rows(8, 12)
    x = torch.randn(mask.shape, generator=g, dtype=torch.float64) * 5 + 3
    w = whiten(x, mask)
    vals = [x[i, j].item() for i, j in mask.nonzero().tolist()]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    expect = [(v - mean) / math.sqrt(var + 1e-8) for v in vals]
    assert w[mask.bool()].tolist() == pytest.approx(expect, rel=1e-10) and (w[mask == 0] == 0).all()


def test_clipped_losses_equal_their_formulas_in_float64():
    g, mask = random_rows(6, 10)
    logp = torch.randn(mask.shape, generator=g, dtype=torch.float64) * 0.3 - 2
    old = logp + torch.randn(mask.shape, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    values, old_values, returns = (torch.randn(mask.shape, generator=g, dtype=torch.float64) for _ in range(3))
    eps = 0.2
    pg, _, clipped = clipped_policy_loss(logp, old, adv, mask, eps)
    vf, _ = clipped_value_loss(values, old_values, returns, mask, eps)
    for i, j in mask.nonzero().tolist():
        rho, a = math.exp(logp[i, j].item() - old[i, j].item()), adv[i, j].item()
        assert pg[i, j].item() == pytest.approx(max(-a * rho, -a * min(max(rho, 1 - eps), 1 + eps)), rel=1e-12)
        assert clipped[i, j].item() == (-a * min(max(rho, 1 - eps), 1 + eps) > -a * rho)
        v, vo, R = values[i, j].item(), old_values[i, j].item(), returns[i, j].item()
        v_clip = vo + min(max(v - vo, -eps), eps)
        assert vf[i, j].item() == pytest.approx(0.5 * max((v - R) ** 2, (v_clip - R) ** 2), rel=1e-12)
    assert (pg[mask == 0] == 0).all() and (vf[mask == 0] == 0).all() and clipped.any() and not clipped.all()


def test_kl_estimators_equal_their_formulas_and_estimate_the_true_kl():
    g = torch.Generator().manual_seed(1)
    logp, ref = (torch.randn(50, generator=g, dtype=torch.float64) - 3 for _ in range(2))
    for a, b, k1, k3 in zip(logp.tolist(), ref.tolist(), kl_k1(logp, ref).tolist(), kl_k3(logp, ref).tolist()):
        r = math.exp(b - a)
        assert k1 == pytest.approx(a - b, rel=1e-12) and k3 == pytest.approx((r - 1) - math.log(r), rel=1e-9, abs=1e-15)
    assert (kl_k3(logp, ref) >= 0).all() and (kl_k1(logp, logp) == 0).all() and (kl_k3(logp, logp) == 0).all()
    # over tokens sampled from pi, both average to KL(pi || pi_ref) = sum_v pi_v log(pi_v / pi_ref_v)
    p = torch.softmax(torch.randn(20, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(20, generator=g, dtype=torch.float64) * 0.5, 0)
    true_kl = (p * (p / q).log()).sum().item()
    draws = torch.multinomial(p, 400_000, replacement=True, generator=g)
    for estimator in (kl_k1, kl_k3):
        assert estimator(p.log()[draws], q.log()[draws]).mean().item() == pytest.approx(true_kl, rel=0.02)


def test_group_advantages_normalise_each_group_in_float64():
    scores = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 0.5, -1.0, 3.0], dtype=torch.float64)
    adv = group_advantages(scores, 4)
    for k in range(2):
        group = scores[4 * k:4 * k + 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / 3)  # Bessel, as trl
        assert adv[4 * k:4 * k + 4].tolist() == pytest.approx([(s - mean) / (std + 1e-4) for s in group], rel=1e-12)
    assert group_advantages(torch.full((6,), 2.0), 3).eq(0).all()  # a group that ties teaches nothing


def test_adaptive_kl_coefficient_follows_zieglers_controller():
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 100, 10000) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # clipped at +0.2
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 100, 10000) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 64, 640) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


# --- on a real small GPT -----------------------------------------------------------------------------------------

def save_reward_model(path, seed=1):
    torch.manual_seed(seed)
    rm = add_reward_head(GPT(Config(**SMALL)))
    torch.nn.init.normal_(rm.reward_head.weight, std=1.0)
    cfg = Config(**SMALL, finetune="reward")
    checkpoint.save(path, checkpoint.Checkpoint(step=0, config=cfg.to_dict(), model=rm.state_dict()))
    return str(path)


def on_policy_run(tmp_path, finetune="ppo", weights="lora", **overrides):
    cfg = Config(**SMALL, finetune=finetune, finetune_weights=weights, reward_from=save_reward_model(tmp_path / "rm"),
                 out_dir=str(tmp_path / "out"), lora_dropout=0.0, batch_size=4, rl_samples=2 if finetune == "grpo" else 1,
                 rl_max_new_tokens=6, rl_epochs=2, rl_minibatches=2, **overrides)
    torch.manual_seed(0)
    model = GPT(cfg)
    if weights == "lora":
        model = apply_lora(model, cfg)
    objective = method_of(cfg).objective(cfg, model, "cpu")
    return cfg, model, objective, PreferenceBatches(random_pairs(16), cfg.batch_size, cfg.block_size, seed=0)


@pytest.mark.parametrize("finetune,weights", [("ppo", "lora"), ("ppo", "full"), ("grpo", "lora")])
def test_policy_equal_to_reference_has_kl_zero_and_a_first_ratio_of_exactly_one(tmp_path, finetune, weights):
    cfg, model, objective, batches = on_policy_run(tmp_path, finetune, weights)
    loss = objective(model, batches.next())
    scores = objective.pop_scores("")
    assert scores["kl"] == 0.0 and scores["ratio"] == 1.0 and scores["approx_kl"] == 0.0
    rollout = objective._rollout
    assert torch.equal(rollout.old_logp, rollout.ref_logp)  # pi_old = pi_ref at the start: every KL is 0
    assert (rollout.old_logp[rollout.mask == 0] == 0).all() and (rollout.old_logp[rollout.mask.bool()] < 0).all()
    assert len(objective._queue) == cfg.rl_epochs * cfg.rl_minibatches - 1  # the rollout serves 4 steps
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if finetune == "ppo":  # zero-initialised value head: every value 0
        assert model.value_head.weight.abs().sum() == 0 and (rollout.values == 0).all()


@pytest.mark.parametrize("lr,clipped", [(1e-4, False), (1.0, True)])
def test_after_a_large_step_the_ratio_moves_and_the_clip_acts(tmp_path, lr, clipped):
    _, model, objective, batches = on_policy_run(tmp_path, "ppo", "full")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = batches.next()
    fractions = []
    for _ in range(4):  # 2 passes x 2 minibatches over one rollout: the ratio is 1 only before the first step
        objective(model, batch).backward()
        opt.step()
        opt.zero_grad()
        fractions.append(objective.pop_scores("")["clip_fraction"])
    assert fractions[0] == 0 and (max(fractions[1:]) > 0) == clipped


def test_rollouts_stop_at_a_newline_and_include_it(tmp_path):
    newline = stop_ids("newline")
    enc = get_tokenizer()
    assert EOT_ID in newline and enc.encode("\n")[0] in newline and enc.encode("\n\n")[0] in newline
    assert enc.encode(" the")[0] not in newline and stop_ids("eos") == {EOT_ID}
    torch.manual_seed(0)
    model = GPT(Config(**SMALL, tie_embeddings=False)).eval()
    with torch.no_grad():  # the final hidden state is a constant u; "\n" scores 8 against ~0: p = 0.055 a token
        u = torch.nn.functional.normalize(torch.randn(16), dim=0)
        model.ln_f.weight.zero_(), model.ln_f.bias.copy_(u), model.lm_head.weight[198].copy_(8 * u)
    prompts = [[10, 11, 12], [5, 6], [7, 8, 9]]
    responses, stopped = sample(model, prompts, 3, 1.0, 40, newline, torch.Generator().manual_seed(0))
    assert len(responses) == 9 and any(stopped)
    for resp, done in zip(responses, stopped):
        assert all(t not in newline for t in resp[:-1])
        assert (resp[-1] in newline) == done and (done or len(resp) == 40)


def test_config_errors_are_one_line(tmp_path):
    base = dict(**SMALL, finetune="ppo", reward_from="rm")
    for bad, words in ((dict(reward_from=""), "needs reward_from"), (dict(dropout=0.1), "dropout=0"),
                       (dict(finetune="grpo", rl_samples=1), "rl_samples >= 2"),
                       (dict(batch_size=1, rl_minibatches=2), "cannot fill")):
        with pytest.raises(ConfigError, match=words):
            method_of(Config(**{**base, **bad}))
    with pytest.raises(ConfigError, match="reward_from"):
        method_of(Config(**SMALL, finetune="dpo", reward_from="x"))
    with pytest.raises(ConfigError, match="rl_clip"):
        Config(rl_clip=1.5)
    assert METHODS["ppo"].objective is PPO and METHODS["grpo"].objective is GRPO


def test_memory_estimate_counts_the_reference_the_reward_model_and_the_value_head(tmp_path):
    rm = save_reward_model(tmp_path / "rm")
    shape = ModelShape.from_config(Config(**SMALL))
    full = static_bytes(shape, Run.from_config(Config(**SMALL, finetune="full")))
    ppo = static_bytes(shape, Run.from_config(Config(**SMALL, finetune="ppo", reward_from=rm)))
    lora = static_bytes(shape, Run.from_config(Config(**SMALL, finetune="grpo", finetune_weights="lora", lora_dropout=0.0, rl_samples=2, reward_from=rm)))
    assert ppo["frozen_model"] == 2 * full["params"]  # the reference and a reward model of the same shape
    assert ppo["n_trainable"] == full["n_trainable"] + 16 + 1  # + the value head
    assert lora["frozen_model"] == full["params"]  # adapters off: no reference copy, only the reward model


def small_preferences(tmp_path) -> str:
    """20 pairs (18 train, 2 held out): the final report measures 2 prompts, not the plays' 300."""
    words = ["thou", "art", "the", "king", "of", "all", "my", "love", "and", "hate", "this", "night", "shall", "end"]
    rng = random.Random(0)
    lines = [json.dumps({"prompt": "ROMEO:\n" + " ".join(rng.choices(words, k=4)) + "\n",
                         "chosen": " ".join(rng.choices(words, k=3)) + "\n",
                         "rejected": " ".join(rng.choices(words, k=3)) + "\n"}) for _ in range(20)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "pairs.jsonl")


def test_train_py_ppo_lora_resumes_with_its_value_head_and_kl_coef_and_samples(tmp_path, capsys):
    base = tmp_path / "base"
    torch.manual_seed(0)
    checkpoint.save(base, checkpoint.Checkpoint(step=0, config=Config(**SMALL).to_dict(),
                                                model=GPT(Config(**SMALL)).state_dict()))
    rm = save_reward_model(tmp_path / "rm")
    out = tmp_path / "ppo"
    args = ["configs/ppo.py", f"--init_from={base}", f"--reward_from={rm}", f"--out_dir={out}", "--batch_size=4",
            "--rl_max_new_tokens=6", "--eval_iters=1", "--log_interval=1", "--kl_target=1.0", "--kl_horizon=8",
            "--compile=False", f"--preference_data={small_preferences(tmp_path)}"]
    train.main([*args, "--max_iters=4", "--eval_interval=4", "--save_interval=4"])
    ckpt = checkpoint.load(out)
    assert set(ckpt.train_only) == {"value_head.weight", "value_head.bias"} and ckpt.train_only["value_head.bias"] != 0
    assert ckpt.extra["kl_coef"] != 0.05  # the controller moved it (kl 0 < target: down)
    report = capsys.readouterr().out
    assert "reward-model score, greedy" in report and "KL(pi || pi_ref)" in report and "example 1" in report
    train.main([*args, "--max_iters=8", "--eval_interval=8", "--save_interval=8", "--init_from=resume"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[4]["train_kl_coef"] == pytest.approx(ckpt.extra["kl_coef"])  # resumed where it was
    assert "val_greedy_score" in rows[-1] and rows[-1]["val_loss"] == -rows[-1]["val_greedy_score"]
    load_model(str(out))  # sample.py loads the adapters over their base; the value head is not the policy's


def test_train_py_grpo_full_weights_and_sample_py_loads_the_policy(tmp_path):
    rm = save_reward_model(tmp_path / "rm")
    out = tmp_path / "grpo"
    train.main(["configs/grpo.py", "--init_from=scratch", *[f"--{k}={v}" for k, v in SMALL.items()],
                f"--reward_from={rm}", f"--out_dir={out}", "--finetune_weights=full", "--batch_size=2",
                "--rl_samples=2", "--rl_max_new_tokens=4", "--max_iters=2", "--eval_iters=1", "--compile=False",
                f"--preference_data={small_preferences(tmp_path)}"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "train_kl_loss" in rows[-1] and "train_score_std" in rows[-1]
    load_model(str(out))
