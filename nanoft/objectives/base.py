"""What train.py minimises: an objective turns a batch into a loss, and keeps running scores to log.

The loop is the same for every method; only the loss differs:

    next-token cross-entropy   pretraining, full / LoRA / QLoRA SFT        NextTokenLoss (here)
    DPO                        preference pairs, policy against reference  nanoft/objectives/dpo.py
    Bradley-Terry              preference pairs, a scalar reward head      nanoft/objectives/reward.py
    PPO, GRPO                  rollouts sampled from the policy, scored    nanoft/objectives/ppo.py, grpo.py
                               by a reward model
    distillation               token batches, a frozen teacher's softmax   nanoft/objectives/distill.py

An objective is called on the training model and one micro-batch and returns a scalar loss to backpropagate;
`eval_loss` is the number the validation split reports (for distillation the student's plain cross-entropy,
so a distilled and an undistilled student compare). Whatever else a method wants logged (DPO's reward
accuracy and margins, say) it adds with `add_scores`; train.py takes the means since the last log with
`pop_scores("train_")`, and after each evaluation `pop_scores("val_")`, into metrics.jsonl.

The new objectives call `model.hidden_states` (nanoft/model/gpt.py) and build their own heads on it, so they run
in one process: under torchrun that call would bypass DDP's gradient hooks, and `check_single_process` says so.
"""
from __future__ import annotations

import torch
from torch import Tensor

from nanoft.data.tokenizer import get_tokenizer
from nanoft.objectives.sft_eval import task_report
from nanoft.run.distributed import ranks, sum_across_ranks, token_share


class Objective:
    """The base: running sums of detached scalar scores, so logging costs no sync until it is read.

    Two facts each objective states for the memory estimator (nanoft/tools/memory):
    frozen_models: the other models it keeps frozen beside the one it trains ("reference": a copy of the starting
        model, with full weights; "teacher": the teacher_from checkpoint; "reward": the reward_from checkpoint).
    head_shapes(n_embd): the trained heads it adds to the GPT, by parameter name."""

    frozen_models: tuple[str, ...] = ()

    @staticmethod
    def head_shapes(n_embd: int) -> dict[str, tuple[int, ...]]:
        return {}

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def __call__(self, model, batch) -> Tensor:
        raise NotImplementedError

    def begin_step(self, micro_batches: list) -> None:
        """Called with every micro-batch of a training step before the first is used (a no-op by default)."""

    def eval_loss(self, model, batch) -> Tensor:
        return self(model, batch)

    def state_dict(self) -> dict:
        """What the objective keeps between steps that a resumed run needs (JSON, in the checkpoint's extra;
        PPO's adaptive KL coefficient). Nothing by default."""
        return {}

    def add_scores(self, **scores: Tensor) -> None:
        for name, value in scores.items():
            self._sums[name] = self._sums.get(name, 0) + value.detach().float()
        self._count += 1

    def report(self, model, val_examples: list, device, autocast, cfg, sharded: bool) -> str | None:
        """What train.py prints after training: here, 200 sampled tokens after a newline. Under FSDP every rank
        calls it (each holds a shard, so each runs every forward) and train.py prints rank 0's."""
        enc = get_tokenizer()
        start = torch.tensor([enc.encode("\n")], device=device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        ids = [t.item() for t in model.generate(start, 200, temperature=0.8, top_k=200, generator=gen)]
        return "sample:\n" + enc.decode([i for i in ids if i < enc.n_vocab])

    def pop_scores(self, prefix: str) -> dict[str, float]:
        """The mean of each score since the last pop, names prefixed ("train_reward_accuracy"), then reset."""
        means = {prefix + name: (total / self._count).item() for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


class NextTokenLoss(Objective):
    """Pretraining and SFT: the model's own mean cross-entropy of the next token (over the loss mask).

    SFT batches (x, y, loss_mask) hold different numbers of loss tokens: on different ranks, and in different
    micro-batches of one step. Averaging their means (the ranks' gradients by DDP/FSDP, the micro-batches' by
    gradient accumulation) would weight a micro-batch of 5 response tokens like one of 45. So each mean is weighted
    by its share of the step's tokens, counted by `begin_step` over every micro-batch and, with one all-reduce,
    every rank (all must call it): the step's gradient is then the token mean of all its rows, as one process taking the whole
    step as one batch computes it (what transformers calls num_items_in_batch). Evaluation weighs each batch
    by its share of that batch's tokens across ranks. Pretraining rows all count block_size tokens: no weights."""

    def __init__(self, cfg=None, model=None, device=None) -> None:  # the signature every objective has
        super().__init__()
        self._step_scale: Tensor | None = None  # SFT: ranks * micro-batches / the step's loss tokens on all ranks
        self._micro_batches_left = 0

    def begin_step(self, micro_batches: list[tuple[Tensor, ...]]) -> None:
        """SFT: count the step's loss tokens, over its micro-batches and (one all-reduce) every rank's."""
        if len(micro_batches[0]) == 3:
            step_tokens = sum_across_ranks(sum(loss_tokens(batch) for batch in micro_batches).float())
            self._step_scale = ranks() * len(micro_batches) / step_tokens
            self._micro_batches_left = len(micro_batches)

    def __call__(self, model, batch) -> Tensor:  # training: train.py divides each micro-batch's loss by grad_accum
        loss = model(*batch)
        if len(batch) != 3:
            return loss
        if not self._micro_batches_left:  # outside a step that begin_step counted: this batch alone
            return loss * token_share(loss_tokens(batch))
        self._micro_batches_left -= 1
        # its share of the step, n_b * ranks / N, times grad_accum, which train.py's division takes away again
        return loss * loss_tokens(batch) * self._step_scale

    def eval_loss(self, model, batch) -> Tensor:
        loss = model(*batch)
        return loss * token_share(loss_tokens(batch)) if len(batch) == 3 else loss

    def report(self, model, val_examples: list, device, autocast, cfg, sharded: bool) -> str | None:
        """Pretraining: a sample. SFT: the held-out answers (task_report), scored in one process (under FSDP a
        rank holds a shard only: score the checkpoint afterwards, with sample.py)."""
        if not val_examples:
            return super().report(model, val_examples, device, autocast, cfg, sharded)
        if sharded:
            return None
        with autocast:  # as it trained: a LoRA model's frozen base is bf16 on CUDA, its adapters float32
            return task_report(model, val_examples, device, speaker_task=not cfg.sft_data)


def loss_tokens(batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """How many targets an SFT batch's loss averages: inside the loss mask and not padding (y = -1)."""
    _, y, loss_mask = batch
    return ((y != -1) & (loss_mask != 0)).sum()


def check_single_process(name: str) -> None:
    """One line instead of silently unsynchronised gradients: these objectives bypass DDP's forward."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ValueError(f"finetune={name} runs in one process (python train.py ...), not under torchrun")
