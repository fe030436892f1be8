"""Adafactor (Shazeer and Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost").

Adam keeps a second moment V (one value per parameter). For a matrix gradient G (n x m) Adafactor keeps only
its row and column statistics, R (n values) and C (m values), and rebuilds a rank-1 estimate of V from them:

    beta2_t = 1 - t^decay_rate                                   decay_rate = -0.8: beta2 rises towards 1
    R_t = beta2_t R_{t-1} + (1 - beta2_t) mean_j(G^2 + eps1)      row means,    shape (n,)
    C_t = beta2_t C_{t-1} + (1 - beta2_t) mean_i(G^2 + eps1)      column means, shape (m,)
    V_t = R_t C_t^T / mean(R_t)                                   rank-1, the paper's R C / (1^T R) with sums
    U_t = G / sqrt(V_t)
    U_t = U_t / max(1, RMS(U_t) / clip_threshold)                 update clipping (d = 1.0)
    step_t = rho_t * max(eps2, RMS(X_{t-1}))   if scale_parameter, else rho_t
    rho_t = min(1e-2, 1/sqrt(t))   relative_step (min(1e-6 t, 1/sqrt(t)) with warmup_init), else the given lr
    M_t = beta1 M_{t-1} + (1 - beta1) step_t U_t   only if beta1 is given (then one more full-size state)
    X_t = X_{t-1} (1 - weight_decay step_t) - step_t U_t          (or - M_t with beta1)

Tensors of one dimension (biases, LayerNorm) keep a full second moment V_t = beta2_t V + (1 - beta2_t)(G^2 + eps1).
Tensors of more dimensions are factored over their last two: state for an n x m matrix is n + m values.

Under FSDP2 each rank holds some rows of X, G and R (and all of C); the means over rows (C's update, mean(R))
and the RMS values are sums over the whole tensor, all-reduced across ranks (nanoft.optim.sharded), so the step
equals one process's up to the order of those sums. Sharded parameters of more than two dimensions are refused.

The argument names, defaults and the order of operations follow the Hugging Face transformers implementation
whose documented setting this reproduces (`Adafactor(params, lr=None, relative_step=True, ...)`). Note the training loop
sets `group["lr"]` every step: with `relative_step=True` that value is ignored, because the step size then
comes from rho_t above.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from nanoft.optim.sharded import Part, gather_states, global_sum, local_state, part_of
from nanoft.optim.state import load_state_exact


def _rms(x: Tensor, part: Part | None = None) -> Tensor:
    """Root mean square of a whole tensor, or of the tensor whose shard on this rank x is."""
    if part is None:
        return x.norm(2) / math.sqrt(x.numel())
    return global_sum(x.float().pow(2).sum(), part).sqrt() / math.sqrt(part.shape.numel())


class Adafactor(torch.optim.Optimizer):
    """Adafactor with factored second moments for >=2-D tensors; a `torch.optim.Optimizer` with param groups."""

    paged = False
    nominal_bytes_per_param = None  # factored statistics need the matrices' shapes, not only a parameter count
    loss_tolerance = 0.10  # python -m nanoft check: the factored second moment approximates AdamW's

    @classmethod
    def from_config(cls, groups: list[dict], cfg) -> torch.optim.Optimizer:
        """With relative steps lr must be None (transformers' documented Adafactor(lr=None, relative_step=True));
        no first moment (beta1 None), so Adam's betas and eps are not used."""
        return cls(groups, lr=None if cfg.adafactor_relative_step else cfg.lr, relative_step=cfg.adafactor_relative_step,
                   scale_parameter=cfg.adafactor_scale_parameter, warmup_init=cfg.adafactor_warmup_init)

    @staticmethod
    def scratch_bytes(biggest: int, page: int, device: str) -> int:
        """Two float32 temporaries of the tensor being updated (the squared gradient, the update)."""
        return 2 * 4 * biggest

    @staticmethod
    def tensor_state_bytes(shape: tuple[int, ...], elem: int, cfg) -> int:
        """float32 row statistics (one per row) and column statistics (one per column) for a matrix; a full
        float32 second moment for a vector."""
        if len(shape) >= 2:
            return 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
        return 4 * math.prod(shape)

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
    ) -> None:
        if lr is not None and relative_step:
            raise ValueError("Adafactor: pass lr=None with relative_step=True (the step size is computed)")
        if lr is None and not relative_step:
            raise ValueError("Adafactor: relative_step=False needs an lr")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True needs relative_step=True")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Adafactor: beta1 must be in [0, 1), got {beta1}")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)
        super().__init__(params, defaults)

    @staticmethod
    def _step_size(group: dict, step: int, param: Tensor, part: Part | None) -> float:
        """rho_t, times the parameter's RMS when scale_parameter (Section 8 of the paper)."""
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            rho = min(min_step, 1.0 / math.sqrt(step))
        else:
            rho = group["lr"]
        scale = max(group["eps"][1], _rms(param, part).item()) if group["scale_parameter"] else 1.0  # a sync point on GPU
        return scale * rho

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state: dict = {"step": 0}
        if isinstance(p, DTensor):
            if p.dim() > 2:
                raise ValueError(f"Adafactor under FSDP takes parameters of 1 or 2 dimensions, got {tuple(p.shape)}")
            p = p.to_local()  # this rank's rows: R and the full-size states are kept for them only
        if p.dim() >= 2:  # factored over the last two dimensions
            state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                if p not in self.state or not self.state[p]:
                    self.state[p] = self._init_state(p, group)
                self._update(p, self.state[p], group)
        return loss

    def _update(self, p: Tensor, state: dict, group: dict) -> None:
        part = part_of(p)  # None unless p is an FSDP2 shard
        grad = p.grad.float() if part is None else p.grad.to_local().float()  # statistics in fp32 always
        p = p if part is None else p.to_local()
        p32 = p if p.dtype == torch.float32 else p.float()
        state["step"] += 1
        t = state["step"]
        step_size = self._step_size(group, t, p32, part)
        beta2t = 1.0 - math.pow(t, group["decay_rate"])

        update = grad * grad + group["eps"][0]  # G^2 + eps1
        if p.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)  # (..., n)
            col_mean = update.mean(dim=-2) if part is None else global_sum(update.sum(dim=0), part) / part.shape[0]
            col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)  # (..., m)
            row_mean = (row.mean(dim=-1, keepdim=True) if part is None
                        else global_sum(row.sum(dim=-1, keepdim=True), part) / part.shape[0])
            # 1 / sqrt(V) = rsqrt(R / mean(R)) (..., n, 1) * rsqrt(C) (..., 1, m); V itself is never stored
            r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad)
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = v.rsqrt().mul_(grad)

        update.div_((_rms(update, part) / group["clip_threshold"]).clamp_(min=1.0))  # update clipping
        update.mul_(step_size)
        if group["beta1"] is not None:
            m = state["exp_avg"]
            m.mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
            update = m
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * step_size)
        p32.add_(-update)
        if p32 is not p:
            p.copy_(p32)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but states keep their saved float32 dtype (torch would cast them to the param's); under
        FSDP2 each rank keeps its part of the whole saved states."""
        def place(p: Tensor, name: str, t: Tensor) -> Tensor:
            t = local_state(name, t, p, part_of(p)) if isinstance(p, DTensor) else t
            return t.to(device=p.device, copy=True)

        load_state_exact(self, state_dict, place)

    def state_dict(self) -> dict:
        """As torch's; under FSDP2 every state is gathered whole (every rank must call), as one process has it."""
        return gather_states(self, super().state_dict())
