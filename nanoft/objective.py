"""What train.py minimises: an objective turns a batch into a loss, and keeps running scores to log.

The loop is the same for every method; only the loss differs:

    next-token cross-entropy   pretraining, full / LoRA / QLoRA SFT        NextTokenLoss (here)
    DPO                        preference pairs, policy against reference  nanoft/dpo.py
    Bradley-Terry              preference pairs, a scalar reward head      nanoft/reward.py
    distillation               token batches, a frozen teacher's softmax   nanoft/distill.py

An objective is called on the training model and one micro-batch and returns a scalar loss to backpropagate;
`eval_loss` is the number the validation split reports (for distillation the student's plain cross-entropy,
so a distilled and an undistilled student compare). Whatever else a method wants logged (DPO's reward
accuracy and margins, say) it adds with `add_scores`; train.py takes the means since the last log with
`pop_scores("train_")`, and after each evaluation `pop_scores("val_")`, into metrics.jsonl.

The new objectives call `model.hidden_states` (nanoft/model.py) and build their own heads on it, so they run
in one process: under torchrun that call would bypass DDP's gradient hooks, and `check_single_process` says so.
"""
from __future__ import annotations

import torch
from torch import Tensor

from nanoft.distributed import token_share


class Objective:
    """The base: running sums of detached scalar scores, so logging costs no sync until it is read."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def __call__(self, model, batch) -> Tensor:
        raise NotImplementedError

    def eval_loss(self, model, batch) -> Tensor:
        return self(model, batch)

    def add_scores(self, **scores: Tensor) -> None:
        for name, value in scores.items():
            self._sums[name] = self._sums.get(name, 0) + value.detach().float()
        self._count += 1

    def pop_scores(self, prefix: str) -> dict[str, float]:
        """The mean of each score since the last pop, names prefixed ("train_reward_accuracy"), then reset."""
        means = {prefix + name: (total / self._count).item() for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


class NextTokenLoss(Objective):
    """Pretraining and SFT: the model's own mean cross-entropy of the next token (over the loss mask).

    SFT batches (x, y, loss_mask) carry different numbers of loss tokens on different ranks, so under torchrun
    each rank's mean is weighted by its share of the tokens (`distributed.token_share`): the gradient DDP/FSDP
    average is then one process's over all the rows. Micro-batches of gradient accumulation stay equally
    weighted, in one process as under torchrun (train.py divides each by grad_accum)."""

    def __init__(self, cfg=None, model=None, device=None) -> None:  # the signature every objective has
        super().__init__()

    def __call__(self, model, batch) -> Tensor:
        loss = model(*batch)[1]
        if len(batch) == 3:  # SFT: count the tokens the loss averaged (y is -1 on padding)
            _, y, loss_mask = batch
            loss = loss * token_share(((y != -1) & (loss_mask != 0)).sum())
        return loss


def check_single_process(name: str) -> None:
    """One line instead of silently unsynchronised gradients: these objectives bypass DDP's forward."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ValueError(f"finetune={name} runs in one process (python train.py ...), not under torchrun")
