"""Loading an optimizer's saved state without torch's casts: shared by every optimizer in this package.

torch.optim.Optimizer.load_state_dict casts every floating-point state to its parameter's dtype and moves it to
the parameter's device. That rounds a float32 absmax or Adafactor statistic to bfloat16 for a bfloat16 model,
and would pull all of a paged optimizer's host states onto the GPU at once. Here the param groups are loaded by
torch (which checks the sizes) and every state tensor keeps the dtype it was saved with; where it goes is the
optimizer's choice.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def loaded_pairs(optimizer: torch.optim.Optimizer, state_dict: dict) -> list[tuple[Tensor, dict]]:
    """torch's Optimizer.load_state_dict for the param groups only; returns (parameter, its saved state) pairs."""
    torch.optim.Optimizer.load_state_dict(optimizer, {**state_dict, "state": {}})  # checks sizes, sets groups
    saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [(p, state_dict["state"][pid]) for pid, p in zip(saved_ids, params) if pid in state_dict["state"]]


def load_state_exact(optimizer: torch.optim.Optimizer, state_dict: dict,
                     place: Callable[[Tensor, str, Tensor], Tensor]) -> None:
    """Load `state_dict` with every state tensor kept in its saved dtype: `place(param, name, saved_tensor)`
    puts a copy of it where this optimizer keeps it (the loaded dict may be reused)."""
    for p, saved in loaded_pairs(optimizer, state_dict):
        optimizer.state[p] = {name: place(p, name, value) if isinstance(value, Tensor) else value
                              for name, value in saved.items()}
