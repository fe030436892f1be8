"""Steps with a non-finite loss or gradient are skipped, and too many in a row stop the run.

    guard = StepGuard(cfg.max_bad_steps, scaler.is_enabled(), dist)
    if guard.ok(loss, grad_norm, step, stop.requested): optimizer.step()   # a non-finite loss or gradient skips it
    if guard.stop: ...                  # a rank was asked to stop (nanoft.run.stop): save, exit
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from nanoft.run import distributed


class Diverged(ValueError):
    """Too many steps in a row had a non-finite loss or gradient norm."""


class StepGuard:
    """Skips optimizer steps whose loss or gradient norm is NaN or inf, and stops the run after
    max_bad_steps of them in a row (the weights are still the last good ones: skipped steps change nothing).

    With fp16's GradScaler an infinite gradient is routine (the loss scale was too high): the scaler skips
    that step and lowers its scale in `scaler.update()`, which still runs. Those count as skipped, but only a
    non-finite *loss* counts towards stopping. Costs one device-to-host sync per step (and, under torchrun,
    one small all-reduce so that every rank skips the same steps). The same all-reduce carries Ctrl-C's
    request (StopRequest): `stop` is then True on every rank alike, so all of them stop after the same step."""

    def __init__(self, max_bad_steps: int, fp16_scaler: bool, dist: distributed.Dist):
        self.max_bad_steps, self.fp16_scaler, self.dist = max_bad_steps, fp16_scaler, dist
        self.skipped = 0  # steps skipped so far in this process (logged as "skipped")
        self.in_a_row = 0
        self.stop = False  # some rank was asked to stop (Ctrl-C, SIGTERM) by the last call
        self.grad_norm: torch.Tensor | None = None  # the last step's gradient norm, before clipping

    def ok(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, stop_requested: bool = False) -> bool:
        if hasattr(grad_norm, "full_tensor"):  # fsdp: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        self.grad_norm = grad_norm  # the whole model's, before clipping: train.py logs it
        bad_loss = (~torch.isfinite(loss.detach().float())).float()
        bad_grad = (~torch.isfinite(grad_norm.detach().float())).float().to(bad_loss.device)
        stop = torch.tensor(float(stop_requested), device=bad_loss.device)
        *flags, stop = distributed.mean_across_ranks(torch.stack([bad_loss, bad_grad, stop]), self.dist).tolist()
        self.stop = stop > 0
        if not any(flags):
            self.in_a_row = 0
            return True
        self.skipped += 1
        if flags[0] or not self.fp16_scaler:
            self.in_a_row += 1
        if self.dist.is_master:
            tqdm.write(f"step {step}: non-finite {'loss' if flags[0] else 'gradient norm'}, step skipped "
                       f"({self.in_a_row} in a row, {self.skipped} in all)")
        if self.in_a_row >= self.max_bad_steps:
            raise Diverged(f"training diverged: {self.in_a_row} steps in a row up to step {step} had a non-finite "
                           f"{'loss' if flags[0] else 'gradient norm'} and were skipped (max_bad_steps="
                           f"{self.max_bad_steps}); the last checkpoint is kept; lower lr or check the data")
        return False
