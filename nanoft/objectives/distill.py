"""Knowledge distillation: a student learns from a teacher's whole softmax, not only from the next token.

Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network" (https://arxiv.org/abs/1503.02531).
A trained teacher's output says more than the one-hot target: which other tokens it finds plausible, and how
much ("dark knowledge"). Softening both distributions with a temperature T > 1 exposes the small
probabilities, and the student matches them while still fitting the data. Per position, with teacher logits
z_t, student logits z_s and the true next token y:

    L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )  +  (1 - alpha) * CE( softmax(z_s), y )

    KL(p || q) = sum_v p_v (log p_v - log q_v)

averaged over the positions. The T^2 keeps the soft term's gradients the same size as T changes (they scale as
1/T^2: section 2 of the paper). alpha = cfg.distill_alpha, T = cfg.distill_temperature.

The student is the model being trained, of any shape (cfg's n_layer, n_head, n_embd; usually smaller), from
scratch or from init_from. The teacher (cfg.teacher_from, a full nanoft checkpoint; merge a LoRA adapter first)
keeps its own shape; it must share the vocabulary and reach the student's block_size. It runs frozen, in eval
mode, under no_grad: its hidden states carry no graph. The two logit tensors, (B*T, V) each, are the largest
of the step (412 MB apiece in float32 for 2,048 tokens of GPT-2's vocabulary); the loss never holds either
whole: it works through chunks of rows (nanoft/model/logprobs.py), each chunk's teacher and student logits made,
reduced to that chunk's sums and freed, and made again by backward for that chunk's gradient.

The validation loss train.py reports for a distillation run is the student's plain cross-entropy
(`eval_loss`), so a distilled student and one trained alone compare on one number. Scores logged: the mean KL
and cross-entropy parts (train_kl, train_ce).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoft.config import Config
from nanoft.model import GPT
from nanoft.model.logprobs import chunked, head_logits
from nanoft.objectives.base import Objective, check_single_process
from nanoft.run import checkpoint
from nanoft.run.base_model import load_base_model


def distill_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
                 targets: Tensor, temperature: float, alpha: float, chunk_rows: int | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mean KL, mean CE) over N positions: hiddens (N, C_s) and (N, C_t), heads (V, C_s) and (V, C_t),
    targets (N,) with -1 for positions that do not count. Never more than chunk_rows x V logits of each."""
    T = temperature

    def chunk_sums(h_s: Tensor, h_t: Tensor, y: Tensor) -> Tensor:
        z_s, z_t = head_logits(h_s, student_head), head_logits(h_t, teacher_head)  # (rows, V) float32 each
        log_q = F.log_softmax(z_s / T, dim=-1)
        log_p = F.log_softmax(z_t / T, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (rows,)
        ce = F.cross_entropy(z_s, y.clamp(min=0), reduction="none")  # (rows,)
        counted = (y >= 0).float()
        return torch.stack(((kl * counted).sum(), (ce * counted).sum()))[None]  # (1, 2)

    sums = chunked(chunk_sums, student_hidden, teacher_hidden, targets, vocab=student_head.size(0),
                   chunk_rows=chunk_rows).sum(dim=0)
    n = (targets >= 0).sum().clamp(min=1)
    kl, ce = sums[0] / n, sums[1] / n
    return alpha * T * T * kl + (1 - alpha) * ce, kl.detach(), ce.detach()


def load_teacher(cfg: Config, device: str | torch.device) -> GPT:
    """The teacher at cfg.teacher_from in its own shape, frozen, in eval mode, on device."""
    ckpt = checkpoint.load(cfg.teacher_from)
    teacher_cfg = Config.from_dict(ckpt.config)
    if teacher_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"teacher {cfg.teacher_from} has vocab_size={teacher_cfg.vocab_size}, the student "
                         f"{cfg.vocab_size}: distillation compares their softmaxes token by token")
    if teacher_cfg.block_size < cfg.block_size:
        raise ValueError(f"teacher {cfg.teacher_from} has block_size={teacher_cfg.block_size} < the student's "
                         f"{cfg.block_size}")
    teacher_cfg = dataclasses.replace(teacher_cfg, block_size=cfg.block_size, dropout=0.0, gradient_checkpointing=False,
                                      finetune="none", init_from="scratch")
    teacher = load_base_model(teacher_cfg, cfg.teacher_from)  # refuses LoRA adapters in one line
    return teacher.to(device).eval().requires_grad_(False)


class Distillation(Objective):
    """finetune="distill": the student (the model train.py trains) against a frozen teacher, on token batches."""

    frozen_models = ("teacher",)

    def __init__(self, cfg: Config, model: nn.Module, device: str | torch.device):
        super().__init__()
        check_single_process("distill")
        self.teacher = load_teacher(cfg, device)
        self.temperature, self.alpha = cfg.distill_temperature, cfg.distill_alpha

    def __call__(self, model: GPT, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch[0], batch[1]
        student_hidden = model.hidden_states(x).flatten(0, 1)  # (B*T, C_s)
        with torch.no_grad():
            teacher_hidden = self.teacher.hidden_states(x).flatten(0, 1)  # (B*T, C_t), no graph
        loss, kl, ce = distill_loss(student_hidden, model.lm_head.weight, teacher_hidden, self.teacher.lm_head.weight,
                                    y.flatten(), self.temperature, self.alpha)
        self.add_scores(kl=kl, ce=ce)
        return loss

    def eval_loss(self, model: GPT, batch: tuple[Tensor, Tensor]) -> Tensor:
        return model(*batch)  # the student's own next-token cross-entropy
