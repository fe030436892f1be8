"""PPO: RLHF's third stage, the policy trained against the reward model with a KL penalty to where it started.

Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT,
https://arxiv.org/abs/2203.02155), section 3.5, after Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593):
maximise E[r(x, y)] - beta KL(pi || pi_ref) with PPO (Schulman et al. 2017). Per rollout (nanoft/objectives/
on_policy.py makes it and schedules its epochs and minibatches):

    reward of response token t   -beta KL_t (k1 or k3 of pi_old against pi_ref: cfg.kl_estimator)
                                 + r(x, y) at the last token (the reward model's score; optionally normalised to
                                   mean 0, std 1 on the reference's samples; minus rl_no_stop_penalty for a response
                                   that never stopped)
    values V_t                   a value head, nn.Linear(n_embd, 1) starting at zero, on the policy's own hidden
                                 states (the trunk is shared, as trl's AutoModelForCausalLMWithValueHead; InstructGPT
                                 used a separate value model started from the reward model: twice the weights)
    advantages                   GAE(gamma, lambda) on those rewards and values, whitened over the rollout
    loss                         L^CLIP(eps) + vf_coef * clipped value loss          (nanoft/objectives/rl_math.py)

beta (cfg.kl_coef) is fixed, or, with cfg.kl_target > 0, moved each rollout by Ziegler et al.'s controller.
Logged per step: policy_loss, value_loss, approx_kl (1/2 mean (log pi - log pi_old)^2 over tokens, as trl),
clip_fraction (tokens where the clipped term is the larger), value_clip_fraction, ratio; per rollout: score
(the raw reward-model score), kl (log pi_old(y|x) - log pi_ref(y|x) per response), stopped, response_tokens, kl_coef.

Defaults follow trl's PPO (4 epochs, 1 minibatch, clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95,
kl_coef 0.05, temperature 0.7, k1); configs/ppo.py says where it differs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nanoft.config import Config
from nanoft.model.gpt import GPT
from nanoft.objectives.on_policy import OnPolicy, Rollout
from nanoft.objectives.rl_math import (
    adaptive_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    token_rewards,
    whiten,
)
from nanoft.objectives.rollout import response_logprobs


def add_value_head(model: GPT) -> GPT:
    """model.value_head: nn.Linear(n_embd, 1), zero at the start (every value 0: the first advantages are the
    rewards-to-go themselves)."""
    head = nn.Linear(model.cfg.n_embd, 1, device=model.wte.weight.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.value_head = head
    return model


class PPO(OnPolicy):
    """finetune="ppo"."""

    uses_values = True

    @staticmethod
    def head_shapes(n_embd: int) -> dict[str, tuple[int, ...]]:
        return {"value_head.weight": (1, n_embd), "value_head.bias": (1,)}  # add_value_head's nn.Linear(C, 1)

    def __init__(self, cfg: Config, model: GPT, device: str | torch.device):
        super().__init__(cfg, model, device)  # the reference is taken first: it has no value head
        add_value_head(model)  # before the optimizer is made and a resumed checkpoint is loaded

    def prepare(self, rollout: Rollout) -> Rollout:
        cfg, mask = self.cfg, rollout.mask
        kl = self.kl_per_token(rollout.old_logp, rollout.ref_logp) * mask
        rewards = token_rewards(kl, rollout.scores, mask, self.kl_coef)
        advantages, rollout.returns = gae(rewards, rollout.values, mask, cfg.gae_gamma, cfg.gae_lambda)
        rollout.advantages = whiten(advantages, mask)
        self._rollout_scores["kl_coef"] = torch.tensor(self.kl_coef)
        if cfg.kl_target > 0:  # for the next rollout
            self.kl_coef = adaptive_kl_coef(self.kl_coef, kl.sum(dim=1).mean().item(), cfg.kl_target,
                                            mask.size(0), cfg.kl_horizon)
        return rollout

    def loss(self, model: nn.Module, rollout: Rollout, rows: Tensor, scale: float) -> tuple[Tensor, dict]:
        mask = rollout.mask[rows]
        logp, values = response_logprobs(model, rollout.x[rows], rollout.y[rows], mask, self.cfg.rl_temperature,
                                         model.value_head)
        old_logp = rollout.old_logp[rows]
        pg, ratio, clipped = clipped_policy_loss(logp, old_logp, rollout.advantages[rows], mask, self.cfg.rl_clip)
        vf, v_clipped = clipped_value_loss(values, rollout.values[rows], rollout.returns[rows], mask, self.cfg.vf_clip)
        policy_loss, value_loss = pg.sum() * scale, vf.sum() * scale
        n = mask.sum()
        scores = {"policy_loss": policy_loss, "value_loss": value_loss,
                  "approx_kl": 0.5 * (((logp - old_logp) ** 2) * mask).sum() / n,
                  "clip_fraction": clipped.sum() / n, "value_clip_fraction": v_clipped.sum() / n,
                  "ratio": (ratio * mask).sum() / n}
        return policy_loss + self.cfg.vf_coef * value_loss, scores
