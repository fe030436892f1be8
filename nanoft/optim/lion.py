"""Lion: the sign of an interpolated momentum, one state tensor per parameter.

Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms" (https://arxiv.org/abs/2302.06675),
Algorithm 2 (found by a program search over update rules). With gradient g and momentum m:

    c = beta1 m + (1 - beta1) g              the update's direction: an interpolation of momentum and gradient
    p = p (1 - lr wd) - lr sign(c)           decoupled weight decay, then a step of the same size on every weight
    m = beta2 m + (1 - beta2) g              the momentum, tracked with a slower decay (beta2 > beta1)

Every coordinate moves by exactly lr (sign is +-1; 0 where c is 0), so the update's norm is larger than AdamW's,
whose per-coordinate steps are mostly below lr: the paper uses a learning rate 3-10x smaller than AdamW's and a
weight decay 3-10x larger, to keep lr * wd alike (set --lr and --weight_decay accordingly). Its defaults are
beta1 = 0.9, beta2 = 0.99; nanoft passes the config's beta1 and beta2 (0.9 and 0.95 unless set: --beta2=0.99
gives the paper's). Only m is kept: 4 bytes per float32 parameter, where AdamW keeps m and v, 8.

Elementwise, so under FSDP2 each rank updates its own shard (a DTensor) with no communication.
State per parameter: exp_avg (the parameter's shape and dtype), torch.optim's name for a first moment.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class Lion(torch.optim.Optimizer):
    paged = False  # its state stays on the parameter's device
    nominal_bytes_per_param = 4.0  # one float32 moment: what a bare parameter count costs (the memory estimator)
    loss_tolerance = 0.25  # python -m nanoft check: relative distance of its loss from AdamW's at the same lr and steps

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if not 0.0 < lr:
            raise ValueError(f"Lion: lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @classmethod
    def from_config(cls, groups: list[dict], cfg) -> Lion:
        return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)

    @staticmethod
    def scratch_bytes(biggest: int, page: int, device: str) -> int:
        """One temporary of the tensor being updated: c, the interpolation whose sign is the step."""
        return 4 * biggest

    @staticmethod
    def tensor_state_bytes(shape: tuple[int, ...], elem: int, cfg) -> int:
        """Bytes of state for one trainable tensor of `shape` with `elem` bytes per element: exp_avg alone."""
        n = 1
        for d in shape:
            n *= d
        return n * elem

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g: Tensor = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                c = m.mul(beta1).add_(g, alpha=1 - beta1)  # beta1 m + (1 - beta1) g
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(c.sign_(), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)  # beta2 m + (1 - beta2) g
        return loss
