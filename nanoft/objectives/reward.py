"""A reward model: RLHF's second stage, a GPT that scores a response instead of writing one.

Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT,
https://arxiv.org/abs/2203.02155), section 3.5: start from the SFT model, take away the head that predicts
tokens and put a scalar head in its place, read at the last token of prompt + response:

    r(x, y) = w . h_last + b          h_last: the final hidden state (n_embd,) at the response's last token

and fit it to preference pairs with the Bradley-Terry model, P(y_w preferred to y_l) = sigma(r_w - r_l), i.e.
by minimising the pairs' mean

    L = -log sigma( r(x, y_w) - r(x, y_l) )

Only differences of rewards enter, so a reward is defined up to a constant. The head starts at zero (every
pair ties, accuracy 0 by strict comparison, loss log 2); the whole model trains with it (full weights). The
measure is the held-out pairwise accuracy, the fraction of pairs with r_w > r_l (chance: 0.5).

RLHF's third stage optimises a policy against this reward with a KL penalty to the starting model:
nanoft/objectives/ppo.py (PPO, as InstructGPT) and grpo.py (GRPO); nanoft/objectives/dpo.py optimises the same
preferences without a reward model.

The head is `model.reward_head`, a submodule of the GPT, so the optimizer, the checkpoint (its weights beside
the model's) and resume see it as any other weight. `python -m nanoft reward OUT_DIR --prompt P --response R`
prints a trained model's reward.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoft.config import Config
from nanoft.data.preferences import PreferencePair, fitting, pair_rows
from nanoft.model.gpt import GPT
from nanoft.objectives.base import Objective, check_single_process
from nanoft.run import checkpoint


def add_reward_head(model: GPT) -> GPT:
    """model.reward_head: nn.Linear(n_embd, 1), zero at the start (every response scores 0)."""
    head = nn.Linear(model.cfg.n_embd, 1, device=model.wte.weight.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.reward_head = head
    return model


def load_reward_model(source: str, device: str | torch.device = "cpu") -> GPT:
    """A finetune="reward" checkpoint as a GPT with its reward_head, frozen, in eval mode, on device."""
    ckpt = checkpoint.load(source)
    cfg = dataclasses.replace(Config.from_dict(ckpt.config), dropout=0.0, gradient_checkpointing=False)
    if cfg.finetune != "reward":
        raise ValueError(f"{source} holds a finetune={cfg.finetune!r} run, not a reward model (finetune=reward)")
    model = add_reward_head(GPT(cfg))
    checkpoint.load_weights(model, ckpt.model, source)
    return model.to(device).eval().requires_grad_(False)


def rewards(model: GPT, x: Tensor, mask: Tensor) -> Tensor:
    """(R,) float32 reward of each row of an SFT-style batch: the head at the row's last response token, the
    last position whose mask is 1 (its input x is the final response token; its target, <|endoftext|>)."""
    hidden = model.hidden_states(x)  # (R, T, C)
    positions = torch.arange(mask.size(1), device=mask.device)
    last = (mask.bool() * positions).argmax(dim=1)  # (R,) the last masked position
    return model.reward_head(hidden[torch.arange(x.size(0), device=x.device), last]).squeeze(-1).float()


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    return -F.logsigmoid(chosen - rejected).mean()


class RewardModel(Objective):
    """finetune="reward": the Bradley-Terry loss on preference batches (B chosen rows, then B rejected)."""

    @staticmethod
    def head_shapes(n_embd: int) -> dict[str, tuple[int, ...]]:
        return {"reward_head.weight": (1, n_embd), "reward_head.bias": (1,)}  # add_reward_head's nn.Linear(C, 1)

    def __init__(self, cfg: Config, model: GPT, device: str | torch.device):
        super().__init__()
        check_single_process("reward")
        add_reward_head(model)  # before the optimizer is made and a resumed checkpoint is loaded

    def __call__(self, model: GPT, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, _, mask = batch
        chosen, rejected = rewards(model, x, mask).chunk(2)
        self.add_scores(accuracy=(chosen > rejected).float().mean(), margin=(chosen - rejected).mean())
        return bradley_terry_loss(chosen, rejected)

    @torch.no_grad()
    def pairwise_accuracy(self, model: GPT, pairs: list[PreferencePair], device, pairs_per_forward: int = 64) -> float:
        pairs = fitting(pairs, model.block_size)
        wins = 0
        was_training = model.training
        model.eval()
        try:
            for i in range(0, len(pairs), pairs_per_forward):
                x, _, mask = (t.to(device) for t in pair_rows(pairs[i:i + pairs_per_forward], model.block_size))
                chosen, rejected = rewards(model, x, mask).chunk(2)
                wins += (chosen > rejected).sum().item()
        finally:
            model.train(was_training)
        return wins / len(pairs)

    def report(self, model: GPT, val_pairs: list[PreferencePair], device, autocast, cfg, sharded: bool) -> str:
        with autocast:
            accuracy = self.pairwise_accuracy(model, val_pairs, device)
        return f"held-out pairwise accuracy (r(chosen) > r(rejected), {len(val_pairs)} pairs): {accuracy:.3f} (chance 0.500)"
