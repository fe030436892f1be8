"""AdamW whose two states are stored in 8 bits (block-wise dynamic quantization, as bitsandbytes' AdamW8bit).

AdamW (Loshchilov and Hutter, 2019) keeps, per parameter, a first moment m and a second moment v:

    m = beta1 m + (1 - beta1) g              v = beta2 v + (1 - beta2) g^2
    p = p (1 - lr wd) - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

In float32 that is 8 bytes of state per parameter. Here m and v are kept as one byte each plus one float32
absmax per block of 256 values (Dettmers et al. 2022, arXiv:2110.02861): m with the signed dynamic map, v with
the unsigned one. 2 + 2 * 4 / 256 = 2.03 bytes per parameter. Each step dequantizes, updates in float32 and
requantizes with a fresh absmax; nanoft.kernels.adamw8bit holds that update (a fused Triton kernel on CUDA,
its PyTorch reference elsewhere) and says which of bitsandbytes' semantics it follows (the CPU package's).

Tensors with fewer than `min_8bit_size` (4096) elements (biases, LayerNorms) keep float32 states: they are a
tiny share of the memory and quantizing them buys nothing. Their update is torch.optim.AdamW's, op for op.

State per parameter (plain tensors and ints, so the safetensors checkpoint can hold them):
    32-bit: step (int), exp_avg, exp_avg_sq (float32, the parameter's shape) -- torch.optim.AdamW's names
    8-bit:  step (int), exp_avg_codes, exp_avg_sq_codes (uint8, the parameter's shape),
            exp_avg_absmax, exp_avg_sq_absmax (float32, [ceil(numel / 256)])
            -- bitsandbytes calls them state1, state2, absmax1, absmax2.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from nanoft.kernels.adamw8bit import BLOCKSIZE, adamw8bit_update_


@torch.no_grad()
def adamw_update_32bit_(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, *,
    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """One AdamW step with float32 states, in place: torch.optim.AdamW's single-tensor update, op for op.

    Elementwise throughout, so applying it to consecutive slices (the paged optimizers) gives the same bits.
    """
    p32 = p if p.dtype == torch.float32 else p.float()
    grad = g.float()
    if weight_decay != 0:
        p32.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p32.addcdiv_(m, denom, value=-lr / bias_correction1)
    if p32 is not p:
        p.copy_(p32)


def load_state_exact(optimizer: torch.optim.Optimizer, state_dict: dict,
                     place: Callable[[Tensor, Tensor], Tensor]) -> None:
    """torch's Optimizer.load_state_dict, then every state tensor re-read from `state_dict` as it was saved.

    torch casts floating-point state to the parameter's dtype and moves all state to the parameter's device.
    That would round a float32 absmax to bfloat16 for a bfloat16 model and pull host-resident (paged) states
    onto the GPU. `place(param, saved_tensor)` puts each saved tensor where this optimizer keeps it, keeping
    its dtype, as a copy (the loaded dict may be reused).
    """
    torch.optim.Optimizer.load_state_dict(optimizer, state_dict)  # checks group sizes, restores hyperparameters
    saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, p in zip(saved_ids, params):
        if pid in state_dict["state"]:
            optimizer.state[p] = {name: place(p, value) if isinstance(value, Tensor) else value
                                  for name, value in state_dict["state"][pid].items()}


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit block-wise states for tensors of at least `min_8bit_size` elements.

    Arguments as torch.optim.AdamW and bitsandbytes.optim.AdamW8bit. `backend` picks the 8-bit update:
    "auto" (the fused Triton kernel on CUDA, the PyTorch reference elsewhere), "triton" or "torch".
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
        backend: str = "auto",
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f'backend must be "auto", "triton" or "torch", got {backend!r}')
        self.min_8bit_size = min_8bit_size
        self.backend = backend
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # --- where and how states are kept (the paged subclass overrides these) ---

    def uses_8bit(self, p: Tensor) -> bool:
        return p.numel() >= self.min_8bit_size

    def state_device(self, p: Tensor) -> torch.device:
        return p.device

    def _zeros(self, p: Tensor, shape: tuple | torch.Size, dtype: torch.dtype) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.state_device(p))

    def _init_state(self, p: Tensor) -> dict:
        if not self.uses_8bit(p):
            return {"step": 0, "exp_avg": self._zeros(p, p.shape, torch.float32),
                    "exp_avg_sq": self._zeros(p, p.shape, torch.float32)}
        n_blocks = -(-p.numel() // BLOCKSIZE)
        # zero codes with a zero absmax dequantize to 0 (as bitsandbytes initialises them)
        return {"step": 0,
                "exp_avg_codes": self._zeros(p, p.shape, torch.uint8),
                "exp_avg_absmax": self._zeros(p, (n_blocks,), torch.float32),
                "exp_avg_sq_codes": self._zeros(p, p.shape, torch.uint8),
                "exp_avg_sq_absmax": self._zeros(p, (n_blocks,), torch.float32)}

    def _place_loaded(self, p: Tensor, saved: Tensor) -> Tensor:
        return saved.to(device=self.state_device(p), copy=True)

    # --- the step ---

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
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if not p.is_contiguous():
                    raise ValueError(f"{type(self).__name__} needs contiguous parameters")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                self._update(p, p.grad.contiguous(), state, group)
        self._finish_step()
        return loss

    def _finish_step(self) -> None:
        """Called at the end of every step; the paged subclass waits for its last copies here."""

    def _update(self, p: Tensor, g: Tensor, state: dict, group: dict) -> None:
        """Update the whole tensor at once (flat views share p's and the states' memory)."""
        flat = {name: t.view(-1) for name, t in state.items() if isinstance(t, Tensor)}
        self._update_flat(p.view(-1), g.view(-1), flat, state["step"], group)

    def _update_flat(self, p: Tensor, g: Tensor, states: dict[str, Tensor], step: int, group: dict) -> None:
        """One AdamW step on flat p (a whole parameter or a 256-aligned slice of one) and its states."""
        beta1, beta2 = group["betas"]
        hp = dict(step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                  weight_decay=group["weight_decay"])
        if "exp_avg" in states:
            adamw_update_32bit_(p, g, states["exp_avg"], states["exp_avg_sq"], **hp)
        else:
            adamw8bit_update_(p, g, states["exp_avg_codes"], states["exp_avg_absmax"],
                              states["exp_avg_sq_codes"], states["exp_avg_sq_absmax"], backend=self.backend, **hp)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but 8-bit codes, absmax and float32 states come back with their saved dtypes."""
        load_state_exact(self, state_dict, self._place_loaded)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (the memory this optimizer adds to training)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, Tensor))
