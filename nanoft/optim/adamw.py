"""torch.optim.AdamW, with the facts every entry of nanoft's optimizer table carries.

The update is torch's own, fused: one kernel per step on CUDA; on a CPU one vectorised pass per tensor instead of
torch's default ~10 whole-tensor ops (on configs/tiny.py at 256 wide, 2 cores: 8.6 ms a step against 32.8 ms,
`python bench/bench_optim.py --config=configs/tiny.py --n_embd=256 --only='torch AdamW,torch AdamW unfused'`).
The class only adds how it is built from a Config and what it keeps: exp_avg and exp_avg_sq at the parameter's
dtype, plus a 0-dim float32 step. In float32 that is the 8 bytes of the 16 bytes/parameter rule (4 weight + 4 gradient + 8 Adam states).
"""
from __future__ import annotations

import math

import torch


class AdamW(torch.optim.AdamW):
    paged = False
    nominal_bytes_per_param = 8.0
    loss_tolerance = 0.0  # python -m nanoft check's yardstick: the others' losses are compared with this one's

    @classmethod
    def from_config(cls, groups: list[dict], cfg) -> torch.optim.Optimizer:
        fusable = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
        return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True if fusable else None)

    @staticmethod
    def scratch_bytes(biggest: int, page: int, device: str) -> int:
        """Temporaries during step(): none for the fused update (CUDA and CPU); elsewhere (MPS) two float32 copies
        of the tensor being updated (sqrt(v), then its bias correction)."""
        return 0 if device in ("cuda", "cpu") else 2 * 4 * biggest

    @staticmethod
    def tensor_state_bytes(shape: tuple[int, ...], elem: int, cfg) -> int:
        return 2 * math.prod(shape) * elem + 4
