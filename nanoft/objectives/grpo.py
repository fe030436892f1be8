"""GRPO: PPO's clipped ratio without a value model; each response is judged against the others to its prompt.

Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
(https://arxiv.org/abs/2402.03300), section 4.1. For each prompt, G = cfg.rl_samples responses are sampled from
pi_old and scored by the reward model; every token of response i gets the advantage

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

(a group whose responses all score alike teaches nothing). The loss per response token t, with ratio
rho = pi / pi_old and the k3 estimate of KL(pi || pi_ref) at that token (nanoft/objectives/rl_math.py):

    l_t = -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta k3_t          beta = cfg.kl_coef

The KL is a term of the loss, not of the reward as in PPO: its gradient reaches pi directly, and no value
head or GAE is needed; the reference's log-probabilities are computed once per rollout. Aggregation: token-level,
the sum of l_t over every response token of the minibatch divided by their number (as DAPO, Yu et al. 2025, and
trl's loss_type="dapo"): the paper's per-response mean first would weigh a short response's tokens more than a long one's.

Logged: policy_loss, kl (the mean k3), approx_kl, clip_fraction, ratio, and per rollout score, kl (per response,
k1 of pi_old), stopped, response_tokens, score_std (the mean within-group std: 0 means no signal).
"""
from __future__ import annotations

from torch import Tensor, nn

from nanoft.objectives.on_policy import OnPolicy, Rollout
from nanoft.objectives.rl_math import clipped_policy_loss, group_advantages, kl_k3
from nanoft.objectives.rollout import response_logprobs


class GRPO(OnPolicy):
    """finetune="grpo"."""

    def prepare(self, rollout: Rollout) -> Rollout:
        G = self.cfg.rl_samples
        rollout.advantages = group_advantages(rollout.scores, G)[:, None] * rollout.mask  # (R, T)
        self._rollout_scores["score_std"] = rollout.scores.view(-1, G).std(dim=1).mean()
        return rollout

    def loss(self, model: nn.Module, rollout: Rollout, rows: Tensor, scale: float) -> tuple[Tensor, dict]:
        mask = rollout.mask[rows]
        logp, _ = response_logprobs(model, rollout.x[rows], rollout.y[rows], mask, self.cfg.rl_temperature)
        old_logp = rollout.old_logp[rows]
        pg, ratio, clipped = clipped_policy_loss(logp, old_logp, rollout.advantages[rows], mask, self.cfg.rl_clip)
        kl = kl_k3(logp, rollout.ref_logp[rows]) * mask
        policy_loss, kl_loss = pg.sum() * scale, kl.sum() * scale
        n = mask.sum()
        scores = {"policy_loss": policy_loss, "kl_loss": kl.sum() / n,
                  "approx_kl": 0.5 * (((logp - old_logp) ** 2) * mask).sum() / n,
                  "clip_fraction": clipped.sum() / n, "ratio": (ratio * mask).sum() / n}
        return policy_loss + self.cfg.kl_coef * kl_loss, scores
