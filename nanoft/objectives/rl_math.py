"""The formulas of RL fine-tuning, each one function on padded (rows, T) tensors with a 0/1 mask of the response.

PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) as RLHF uses it (Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593; Ouyang et al. 2022, InstructGPT), and GRPO (Shao et al. 2024, DeepSeekMath,
https://arxiv.org/abs/2402.03300). A response is an episode; its tokens are the actions, chosen by the policy pi
from the state "prompt + the tokens so far". Only masked positions count: every sum and mean below is over them.

KL(pi || pi_ref) per token, from the log-probabilities of the sampled token under each (Schulman, "Approximating
KL divergence", 2020, http://joschu.net/blog/kl-approx.html), with log r = log pi_ref - log pi:

    k1 = -log r = log pi - log pi_ref          unbiased; one sample may be negative
    k3 = (r - 1) - log r                        unbiased too, never negative, lower variance when pi is near pi_ref

Both are 0 exactly when pi = pi_ref. Their expectations over tokens sampled from pi equal the true KL.

GAE (Schulman et al. 2016, https://arxiv.org/abs/1506.02438), with value V_t of the state before token t, reward
r_t, V after the last token = 0:

    delta_t = r_t + gamma V_{t+1} - V_t        A_t = delta_t + gamma lambda A_{t+1}        returns R_t = A_t + V_t

Whitening: A <- (A - mean A) / sqrt(var A + 1e-8) over every response token of the rollout (variance with
Bessel's correction, as trl's masked_whiten), so the policy loss has the same scale whatever the rewards' scale.

The clipped surrogate (PPO's L^CLIP), with ratio rho = pi(a|s) / pi_old(a|s) and advantage A:

    L_pg = mean over tokens of max(-A rho, -A clip(rho, 1 - eps, 1 + eps))

a pessimistic bound: once rho has moved past 1 +- eps in the direction A favours, the gradient stops. The clipped
value loss (as in OpenAI's baselines and trl), with V_old the rollout's values:

    V_clip = V_old + clip(V - V_old, -eps_v, eps_v)      L_vf = 1/2 mean of max((V - R)^2, (V_clip - R)^2)

GRPO drops the value model: G responses are sampled per prompt, each scored r_i, and every token of response i
gets the same advantage, its reward relative to its group:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)        (std with Bessel's correction, as trl)
"""
from __future__ import annotations

import torch
from torch import Tensor

WHITEN_EPS = 1e-8


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per token: log pi - log pi_ref."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per token: r - 1 - log r, r = pi_ref / pi. exp(log r) - 1 via expm1: exact near r = 1."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def token_rewards(kl: Tensor, scores: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """(R, T) PPO rewards: -kl_coef * KL at each response token, plus the row's score (R,) at its last one."""
    rewards = -kl_coef * kl * mask
    positions = torch.arange(mask.size(1), device=mask.device)
    last = (mask.bool() * positions).argmax(dim=1)  # (R,) each row's last response position
    return rewards.index_put((torch.arange(mask.size(0), device=mask.device), last), scores.to(rewards.dtype),
                             accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns), each (R, T), zero outside the mask. The response of each row is one contiguous run
    of masked positions; the value after its last token is 0 (the episode ends there)."""
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * mask[:, t]
        next_value = values[:, t] * mask[:, t]  # 0 past a row's last response token
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries; zero elsewhere."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + WHITEN_EPS) * mask


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(per-token loss (R, T) zero outside the mask, ratio, clipped): L^CLIP's terms; `clipped` marks the tokens
    where the clipped term is the larger (there the gradient is 0)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps, 1 + eps)
    return torch.maximum(unclipped, clipped) * mask, ratio, (clipped > unclipped) & mask.bool()


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, eps: float
                       ) -> tuple[Tensor, Tensor]:
    """(per-token loss (R, T) zero outside the mask, clipped): 1/2 max((V - R)^2, (V_clip - R)^2)."""
    v_clip = old_values + (values - old_values).clamp(-eps, eps)
    plain, clipped = (values - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped) * mask, (clipped > plain) & mask.bool()


def group_advantages(scores: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(R,) GRPO advantages: rows are prompts' groups of group_size consecutive samples."""
    groups = scores.view(-1, group_size)  # (prompts, G)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """Ziegler et al. 2019, section 2.2: a proportional controller that moves kl_coef so the KL per response nears
    the target. e = clip(KL / target - 1, -0.2, 0.2); kl_coef <- kl_coef (1 + e n_samples / horizon)."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_samples / horizon)
