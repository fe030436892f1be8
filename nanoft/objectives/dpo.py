"""DPO: learn from preference pairs directly, with no reward model and no reinforcement learning.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
(https://arxiv.org/abs/2305.18290). RLHF (Ouyang et al. 2022) fits a reward model r(x, y) to human
preferences, then maximises E[r(x, y)] - beta * KL(pi || pi_ref) with PPO. That KL-constrained problem has a
closed-form optimum, pi*(y|x) proportional to pi_ref(y|x) exp(r(x, y) / beta), so the reward a policy
implies is

    r(x, y) = beta * log(pi(y|x) / pi_ref(y|x))   (+ a term of x alone, which cancels in a comparison)

Putting that into the Bradley-Terry likelihood of a preference, P(y_w > y_l) = sigma(r(x, y_w) - r(x, y_l)),
gives a loss on the policy itself, for a prompt x with a chosen (winning) y_w and a rejected (losing) y_l:

    L = -log sigma( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

where log pi(y|x) is summed over the response's tokens (nanoft/model/logprobs.py), averaged over the pairs of a batch.
beta (cfg.dpo_beta, 0.1 in the paper) sets how far the policy may move from the reference: small beta,
far. The gradient raises log pi(y_w|x) and lowers log pi(y_l|x), weighted by sigma(r_l - r_w): most where the
implicit reward still orders the pair wrongly.

The reference pi_ref is the frozen starting model. With LoRA or QLoRA weights (cfg.finetune_weights) it is the
same model with its adapters switched off (and any trained LayerNorms put back to their starting values, a few
KB kept aside): no second copy in memory. With full weights it has to be a frozen copy of the whole model,
made before training: that doubles the weights' memory (not the gradients' or the optimizer's).

Logged (metrics.jsonl, as train_* and val_*): the implicit rewards of the chosen and rejected responses, their
margin r_w - r_l, and the reward accuracy, the fraction of pairs with r_w > r_l (0 at the start, where every
reward is 0). `report` measures the held-out preference accuracy of the model itself, the fraction of pairs with
log pi(y_w|x) > log pi(y_l|x), for the reference and the trained policy.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoft.config import Config
from nanoft.data.preferences import PreferencePair, fitting, pair_rows
from nanoft.model.logprobs import sequence_logprobs
from nanoft.objectives.base import Objective, check_single_process
from nanoft.peft.lora import LoRALinear


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, chosen rewards, rejected rewards) from the four (B,) sequence log-probabilities."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards)  # logsigmoid: no overflow for large margins
    return loss.mean(), chosen_rewards.detach(), rejected_rewards.detach()


class FrozenReference:
    """pi_ref: the model as it was when this was built (call it before training or resuming changes it)."""

    def __init__(self, model: nn.Module, device: str | torch.device):
        self.loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if self.loras:  # the policy itself, adapters off; what else trains (LayerNorms) is put back for the call
            self.copy = None
            self.start = {p: p.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad and not n.endswith(("lora_A", "lora_B"))}
        else:  # full weights: a second model, frozen, without dropout
            self.copy = copy.deepcopy(model).to(device).eval().requires_grad_(False)

    @contextlib.contextmanager
    def _as_reference(self, model: nn.Module):
        """The model with every adapter's update scaled to 0 (x -> W0 x + b exactly) and the other trained
        parameters at their starting values, in eval mode; restored afterwards, whatever happens."""
        scalings = [m.scaling for m in self.loras]
        trained = {p: p.detach().clone() for p in self.start}
        was_training = model.training
        try:
            for m in self.loras:
                m.scaling = 0.0
            for p, v in self.start.items():
                p.data.copy_(v)
            model.eval()
            yield model
        finally:
            for m, s in zip(self.loras, scalings):
                m.scaling = s
            for p, v in trained.items():
                p.data.copy_(v)
            model.train(was_training)

    @contextlib.contextmanager
    def as_model(self, model: nn.Module):
        """pi_ref as a module to call (under no_grad): the frozen copy, or `model` with its adapters off."""
        if self.copy is not None:
            yield self.copy
        else:
            with self._as_reference(model) as reference:
                yield reference

    @torch.no_grad()
    def sequence_logprobs(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        with self.as_model(model) as reference:
            return sequence_logprobs(reference, x, y, mask)


class DPO(Objective):
    """finetune="dpo": the DPO loss on preference batches (nanoft/data/preferences.py: B chosen rows, B rejected)."""

    frozen_models = ("reference",)  # full weights: a frozen copy of the start; LoRA: the same model, adapters off

    def __init__(self, cfg: Config, model: nn.Module, device: str | torch.device):
        super().__init__()
        check_single_process("dpo")
        self.beta = cfg.dpo_beta
        self.reference = FrozenReference(model, device)

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, y, mask = batch
        policy_chosen, policy_rejected = sequence_logprobs(model, x, y, mask).chunk(2)
        ref_chosen, ref_rejected = self.reference.sequence_logprobs(model, x, y, mask).chunk(2)
        loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta)
        self.add_scores(reward_accuracy=(chosen > rejected).float().mean(), reward_margin=(chosen - rejected).mean(),
                        reward_chosen=chosen.mean(), reward_rejected=rejected.mean())
        return loss

    @torch.no_grad()
    def held_out_logprobs(self, model: nn.Module, pairs: list[PreferencePair], device,
                          pairs_per_forward: int = 64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Sequence log-probabilities of every pair that fits: (policy chosen, policy rejected, reference chosen,
        reference rejected), each (pairs,)."""
        block_size = model.block_size
        pairs = fitting(pairs, block_size)
        parts = []
        was_training = model.training
        model.eval()
        try:
            for i in range(0, len(pairs), pairs_per_forward):
                x, y, mask = (t.to(device) for t in pair_rows(pairs[i:i + pairs_per_forward], block_size))
                parts.append((*sequence_logprobs(model, x, y, mask).chunk(2),
                              *self.reference.sequence_logprobs(model, x, y, mask).chunk(2)))
        finally:
            model.train(was_training)
        return tuple(torch.cat(column).float().cpu() for column in zip(*parts))

    def preference_accuracy(self, model: nn.Module, pairs: list[PreferencePair], device, reference: bool = False) -> float:
        """The fraction of pairs with log pi(y_w|x) > log pi(y_l|x): the policy's, or the reference's."""
        policy_w, policy_l, ref_w, ref_l = self.held_out_logprobs(model, pairs, device)
        return ((ref_w > ref_l) if reference else (policy_w > policy_l)).float().mean().item()

    def report(self, model: nn.Module, val_pairs: list[PreferencePair], device, autocast, cfg, sharded: bool) -> str:
        """Two held-out accuracies over every val pair. The model's own: log pi(y_w|x) > log pi(y_l|x), before
        (the reference) and after. DPO's reward accuracy, the paper's measure: r_w > r_l with the implicit reward
        r = beta log(pi / pi_ref), i.e. whether training moved the pair the right way (chance 0.5; 0 at the start,
        where every reward is 0). The second can rise while the first barely moves: DPO widens the margin relative
        to the reference, and a pair the reference orders wrongly by a lot stays wrong for a while."""
        with autocast:
            policy_w, policy_l, ref_w, ref_l = self.held_out_logprobs(model, val_pairs, device)
        before, after = (ref_w > ref_l).float().mean().item(), (policy_w > policy_l).float().mean().item()
        moved = ((policy_w - ref_w) > (policy_l - ref_l)).float().mean().item()
        n = len(policy_w)
        return (f"held-out preference accuracy (log pi(chosen) > log pi(rejected), {n} pairs): reference {before:.3f} "
                f"-> trained {after:.3f}; DPO reward accuracy (r(chosen) > r(rejected)): {moved:.3f} (chance 0.500, "
                f"standard error {0.5 / n ** 0.5:.3f})")
