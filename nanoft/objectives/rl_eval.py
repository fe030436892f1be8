"""How a policy compares with its reference on held-out prompts: the numbers PPO, GRPO and DPO are judged by.

For the val pairs' prompts (nanoft/data/preferences.py; the same 300 DPO reports on), for the reference (the
starting model) and the trained policy:

    greedy score     the reward model's mean score of the greedy response
    sampled score    ... of one response sampled at rl_temperature (a fixed seed: the same draws every time)
    stopped          the share of sampled responses that ended (at a newline / <|endoftext|>) within the limit
    KL               KL(pi || pi_ref) per response, in nats: the mean over the policy's samples of
                     log pi(y|x) - log pi_ref(y|x) (both at rl_temperature), an unbiased estimate (k1)
    preference acc.  the share of held-out pairs with log pi(chosen) > log pi(rejected): the model's own likelihoods

Reward hacking shows as a score that rises while the KL grows large and the samples stop reading like the plays;
`examples` keeps a few prompts' greedy responses before and after to look at.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from nanoft.config import Config
from nanoft.data.preferences import PreferencePair, fitting, pair_rows
from nanoft.data.sft import fit_to_block
from nanoft.data.tokenizer import get_tokenizer
from nanoft.model.logprobs import sequence_logprobs
from nanoft.objectives.rollout import as_rows, response_logprobs, reward_scores, sample, stop_ids

ROWS_PER_FORWARD = 64


def pair_prompts(pairs: list[PreferencePair], block_size: int) -> list[list[int]]:
    """Each pair's prompt ids, cut as its chosen row is cut to fit block_size."""
    prompts = []
    for p in pairs:
        ids, n_prompt = fit_to_block(p.chosen, block_size)
        prompts.append(ids[:n_prompt])
    return prompts


@dataclass
class Side:
    greedy_score: float
    sampled_score: float
    stopped: float
    preference_accuracy: float
    greedy: list[list[int]] = field(repr=False)
    sampled: list[list[int]] = field(repr=False)


@dataclass
class Evaluation:
    prompts: list[list[int]]
    before: Side
    after: Side
    kl: float  # KL(pi || pi_ref) per response, nats, on the policy's samples

    def table(self) -> str:
        b, a = self.before, self.after
        n = len(self.prompts)
        lines = [f"held-out, {n} prompts: reference -> trained",
                 f"  reward-model score, greedy:   {b.greedy_score:+.3f} -> {a.greedy_score:+.3f}",
                 f"  reward-model score, sampled:  {b.sampled_score:+.3f} -> {a.sampled_score:+.3f}",
                 f"  sampled responses that stop:  {b.stopped:.3f} -> {a.stopped:.3f}",
                 f"  KL(pi || pi_ref) per response: 0 -> {self.kl:.3f} nats",
                 (f"  preference accuracy, own likelihoods (log pi(chosen) > log pi(rejected)): "
                  f"{b.preference_accuracy:.3f} -> {a.preference_accuracy:.3f} (standard error {0.5 / n ** 0.5:.3f})")]
        return "\n".join(lines + self.examples())

    def examples(self, k: int = 2) -> list[str]:
        enc = get_tokenizer()
        out = []
        for i in range(min(k, len(self.prompts))):
            out += [f"example {i + 1}, prompt: {enc.decode(self.prompts[i])!r}",
                    f"  before (greedy): {enc.decode(self.before.greedy[i])!r}",
                    f"  after  (greedy): {enc.decode(self.after.greedy[i])!r}"]
        return out


@torch.no_grad()
def own_preference_accuracy(model: nn.Module, pairs: list[PreferencePair]) -> float:
    device = model.lm_head.weight.device
    wins = 0
    for i in range(0, len(pairs), ROWS_PER_FORWARD):
        x, y, mask = (t.to(device) for t in pair_rows(pairs[i:i + ROWS_PER_FORWARD], model.block_size))
        chosen, rejected = sequence_logprobs(model, x, y, mask).chunk(2)
        wins += (chosen > rejected).sum().item()
    return wins / len(pairs)


@torch.no_grad()
def sequence_logps(model: nn.Module, prompts: list[list[int]], responses: list[list[int]], temperature: float
                   ) -> torch.Tensor:
    """(R,) log pi(response | prompt) at temperature, ROWS_PER_FORWARD rows a forward."""
    device = model.lm_head.weight.device
    parts = []
    for i in range(0, len(responses), ROWS_PER_FORWARD):
        x, y, mask = as_rows(prompts[i:i + ROWS_PER_FORWARD], responses[i:i + ROWS_PER_FORWARD], 1,
                             model.block_size, device)
        parts.append(response_logprobs(model, x, y, mask, temperature)[0].sum(dim=1))
    return torch.cat(parts).float().cpu()


def _side(model: nn.Module, reward_model: nn.Module, prompts, pairs, cfg: Config) -> Side:
    stop = stop_ids(cfg.rl_stop)
    greedy, _ = sample(model, prompts, 1, 0.0, cfg.rl_max_new_tokens, stop)
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(cfg.seed)
    sampled, stopped = sample(model, prompts, 1, cfg.rl_temperature, cfg.rl_max_new_tokens, stop, gen)
    return Side(reward_scores(reward_model, prompts, greedy, 1).mean().item(),
                reward_scores(reward_model, prompts, sampled, 1).mean().item(),
                sum(stopped) / len(stopped), own_preference_accuracy(model, pairs), greedy, sampled)


def evaluate(policy: nn.Module, reference: Callable[[], AbstractContextManager[nn.Module]], reward_model: nn.Module,
             pairs: list[PreferencePair], cfg: Config, before: Side | None = None) -> Evaluation:
    """The table above. reference() gives a context that yields pi_ref (the frozen copy, or the policy with its
    adapters off); `before`, the reference's side when it was already measured (several policies, one reference).
    Runs in eval mode; the policy's mode is restored."""
    pairs = fitting(pairs, cfg.block_size)
    prompts = pair_prompts(pairs, cfg.block_size)
    was_training = policy.training
    policy.eval()
    try:
        after = _side(policy, reward_model, prompts, pairs, cfg)
        logp = sequence_logps(policy, prompts, after.sampled, cfg.rl_temperature)
        with reference() as ref:
            before = before or _side(ref, reward_model, prompts, pairs, cfg)
            ref_logp = sequence_logps(ref, prompts, after.sampled, cfg.rl_temperature)
    finally:
        policy.train(was_training)
    return Evaluation(prompts, before, after, (logp - ref_logp).mean().item())
