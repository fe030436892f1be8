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
tiny share of the memory and quantizing them buys nothing. They are many, though (92 of the 100M model's 148
tensors), so they are updated together by torch's own multi-tensor AdamW (`adamw_32bit_`): on CUDA its fused
kernel, one launch for all of them, with the bits of torch.optim.AdamW(fused=True); elsewhere its foreach
path, which on the CPU gives the bits of torch.optim.AdamW's default (tested). One launch instead of ~700 small
eager ops per step. The 8-bit tensors are one fused Triton launch each on CUDA; on the CPU one pass of a C loop
(nanoft.kernels.adamw8bit_cpu, the reference's bits) over chunks of REFERENCE_CHUNK elements (whole blocks, so
the same bits), which also bounds the temporaries of the PyTorch reference where that runs instead.

Under FSDP2 each rank keeps the states of its rows; blocks cut by a shard boundary are completed across ranks
(nanoft.optim.sharded), and state_dict() gathers the whole states, so a checkpoint is one process's.

State per parameter (plain tensors and ints, so the safetensors checkpoint can hold them):
    32-bit: step (int), exp_avg, exp_avg_sq (float32, the parameter's shape) -- torch.optim.AdamW's names
    8-bit:  step (int), exp_avg_codes, exp_avg_sq_codes (uint8, the parameter's shape),
            exp_avg_absmax, exp_avg_sq_absmax (float32, [ceil(numel / 256)])
            -- bitsandbytes calls them state1, state2, absmax1, absmax2.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from nanoft.kernels.adamw8bit import BLOCKSIZE, adamw8bit_update_
from nanoft.optim.sharded import adamw8bit_part_update_, gather_states, local_layout, local_state, part_of
from nanoft.optim.state import loaded_pairs

REFERENCE_CHUNK = 1 << 20  # elements per 8-bit update call on the CPU (a multiple of BLOCKSIZE)

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # state name -> (shape, dtype)


@torch.no_grad()
def adamw_32bit_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[int], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, fused: bool,
) -> None:
    """One AdamW step with float32 states on a list of tensors (one device), in place; steps already counted.

    fused=True is torch.optim.AdamW(fused=True): the same `torch._fused_adamw_` call with the same scalars.
    fused=False is torch.optim.AdamW(foreach=True)'s non-capturable path op for op; on the CPU the foreach
    ops loop over the single-tensor kernels, which makes it bit-identical to torch.optim.AdamW's CPU default
    (tests/optim/test_adamw8bit.py checks both). Elementwise throughout, so applying it to consecutive
    slices of a tensor (the paged optimizers) gives the same bits as applying it to the whole tensor.
    Parameters that are not float32 are updated through float32 copies (the states are float32).
    """
    if not params:
        return
    p32 = [p if p.dtype == torch.float32 else p.float() for p in params]
    g32 = [g if g.dtype == torch.float32 else g.float() for g in grads]
    if fused:
        device = params[0].device
        # torch keeps the step as a float32 tensor on the parameter's device; the kernel only reads it, so
        # tensors with the same count share one (one small fill per distinct count, no host-device copy)
        counts = {s: torch.full((), float(s), dtype=torch.float32, device=device) for s in set(steps)}
        torch._fused_adamw_(p32, g32, exp_avgs, exp_avg_sqs, [], [counts[s] for s in steps], lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                            maximize=False)
    else:
        if weight_decay != 0:
            torch._foreach_mul_(p32, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, g32, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, g32, g32, 1 - beta2)
        step_size = [(lr / (1 - beta1**s)) * -1 for s in steps]
        bias_correction2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p32, exp_avgs, denom, step_size)
    for p, q in zip(params, p32):
        if q is not p:
            p.copy_(q)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit block-wise states for tensors of at least `min_8bit_size` elements.

    Arguments as torch.optim.AdamW and bitsandbytes.optim.AdamW8bit. `backend` picks the 8-bit update:
    "auto" (the fused Triton kernel on CUDA, the PyTorch reference elsewhere), "triton" or "torch".
    `fused` picks the float32 update of the small tensors as torch.optim.AdamW's argument of that name does:
    None means fused on CUDA and foreach elsewhere (the bits of torch.optim.AdamW's default on the CPU).
    """

    paged = False  # the states stay on the parameter's device
    nominal_bytes_per_param = 2 + 8 / 256  # a code byte for m and for v, and a float32 absmax per 256 of each
    loss_tolerance = 0.03  # python -m nanoft check: 8-bit states approximate AdamW's update

    @classmethod
    def from_config(cls, groups: list[dict], cfg) -> torch.optim.Optimizer:
        return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, min_8bit_size=cfg.min_8bit_size)

    @staticmethod
    def scratch_bytes(biggest: int, page: int, device: str) -> int:
        """Temporaries during step(): none for the fused Triton update on CUDA; on a CPU about eight float32
        copies of the tensor updated (read off the allocator trace of a 100M step)."""
        return 0 if device == "cuda" else 33 * biggest

    @staticmethod
    def tensor_state_bytes(shape: tuple[int, ...], elem: int, cfg) -> int:
        """Bytes of state for one trainable tensor: uint8 codes for m and v and a float32 absmax per block of
        256 for each; float32 m and v below min_8bit_size elements."""
        n = math.prod(shape)
        if n < cfg.min_8bit_size:
            return 2 * n * 4
        return 2 * n + 2 * 4 * math.ceil(n / BLOCKSIZE)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
        backend: str = "auto",
        fused: bool | None = None,
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
        self.fused = fused
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # --- which states a parameter has, and where they are kept (the paged subclass overrides _allocate) ---

    def uses_8bit(self, p: Tensor) -> bool:
        return p.numel() >= self.min_8bit_size

    def state_layout(self, p: Tensor) -> Layout:
        """The state tensors `p` gets: name -> (shape, dtype); for an FSDP2 shard, this rank's part of them
        (nanoft.optim.sharded). Whether they are 8-bit is decided by the whole tensor's numel."""
        shape, n_blocks = local_layout(p, part_of(p))
        if not self.uses_8bit(p):
            return {"exp_avg": (shape, torch.float32), "exp_avg_sq": (shape, torch.float32)}
        return {"exp_avg_codes": (shape, torch.uint8), "exp_avg_absmax": ((n_blocks,), torch.float32),
                "exp_avg_sq_codes": (shape, torch.uint8), "exp_avg_sq_absmax": ((n_blocks,), torch.float32)}

    def _allocate(self, layouts: list[tuple[Tensor, Layout]]) -> list[dict[str, Tensor]]:
        """Zero-filled state tensors for each (parameter, layout), all made at once: here beside the parameter.
        (Zero codes with a zero absmax dequantize to 0, as bitsandbytes initialises them.)"""
        return [{name: torch.zeros(shape, dtype=dtype, device=p.device) for name, (shape, dtype) in layout.items()}
                for p, layout in layouts]

    # --- the step ---

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather()
        self._apply([w for w in work if not isinstance(w[0], DTensor)])
        self._apply_sharded([w for w in work if isinstance(w[0], DTensor)])
        return loss

    def _gather(self) -> list[tuple[Tensor, Tensor, dict, dict]]:
        """(parameter, gradient, state, group) for every parameter with a gradient; the states of parameters
        seen for the first time are allocated together, and every step count is advanced."""
        work, new = [], []
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
                    new.append(p)
                work.append((p, p.grad.contiguous(), state, group))
        for p, fresh in zip(new, self._allocate([(p, self.state_layout(p)) for p in new])):
            self.state[p].update({"step": 0, **fresh})
        for _, _, state, _ in work:
            state["step"] += 1
        return work

    def _apply(self, work: list[tuple[Tensor, Tensor, dict, dict]]) -> None:
        """Float32 states: one multi-tensor update per group and device. 8-bit: one update per tensor."""
        buckets: dict[tuple[int, torch.device], list] = {}
        for p, g, state, group in work:
            if "exp_avg" in state:
                bucket = buckets.setdefault((id(group), p.device), [group, [], [], [], [], []])
                for lst, t in zip(bucket[1:], (p, g, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                    lst.append(t)
            else:
                self._update_8bit(p, g, state, state["step"], group)
        for (_, device), (group, ps, gs, ms, vs, steps) in buckets.items():
            adamw_32bit_(ps, gs, ms, vs, steps, **self._hyper(group), fused=self._fused_on(device))

    def _apply_sharded(self, work: list[tuple[Tensor, Tensor, dict, dict]]) -> None:
        """FSDP2 shards, one tensor at a time: 32-bit states element-wise on the local rows, 8-bit ones with the
        block maxima shared between ranks (nanoft.optim.sharded). States kept in host memory (the paged
        subclass on CUDA) visit the device for the update; where they already are, nothing is copied."""
        for p, g, state, group in work:
            local, grad = p.to_local(), g.to_local()
            held = {name: t for name, t in state.items() if isinstance(t, Tensor)}
            states = {name: t.to(local.device, non_blocking=True) for name, t in held.items()}
            if "exp_avg" in states:
                adamw_32bit_([local], [grad], [states["exp_avg"]], [states["exp_avg_sq"]], [state["step"]],
                             **self._hyper(group), fused=self._fused_on(local.device))
            else:
                adamw8bit_part_update_(local, grad, states, part_of(p), step=state["step"], **self._hyper(group))
            for name, t in held.items():
                if states[name] is not t:
                    t.copy_(states[name])

    def _fused_on(self, device: torch.device) -> bool:
        return self.fused if self.fused is not None else device.type == "cuda"

    @staticmethod
    def _hyper(group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])

    def _update_flat(self, p: Tensor, g: Tensor, states: dict[str, Tensor], step: int, group: dict) -> None:
        """One AdamW step on flat p (a whole parameter or a 256-aligned slice of one) and its flat states."""
        if "exp_avg" in states:
            adamw_32bit_([p], [g], [states["exp_avg"]], [states["exp_avg_sq"]], [step], **self._hyper(group),
                         fused=self._fused_on(p.device))
        else:
            self._update_8bit(p, g, states, step, group)

    def _update_8bit(self, p: Tensor, g: Tensor, states: dict, step: int, group: dict) -> None:
        """p, g and the codes share a shape (the parameter's, or flat for a page); absmax is flat."""
        hp = dict(step=step, **self._hyper(group))
        m_codes, m_absmax = states["exp_avg_codes"], states["exp_avg_absmax"]
        v_codes, v_absmax = states["exp_avg_sq_codes"], states["exp_avg_sq_absmax"]
        if p.is_cuda:  # one launch of the fused kernel (or, with backend="torch", one reference call)
            adamw8bit_update_(p, g, m_codes, m_absmax, v_codes, v_absmax, backend=self.backend, **hp)
            return
        # On the CPU the C loop keeps no temporaries; the reference (backend="torch", or no C compiler)
        # materialises float32 m, v and more (~33 bytes per element). Chunks of 1M
        # elements keep that scratch bounded and recycled by malloc: whole, the 100M model's embedding makes
        # ~1 GB of fresh temporaries whose pages the OS faults in and zeroes on every step (2.8x slower).
        p, g, m_codes, v_codes = p.view(-1), g.view(-1), m_codes.view(-1), v_codes.view(-1)
        for start in range(0, p.numel(), REFERENCE_CHUNK):
            end = min(start + REFERENCE_CHUNK, p.numel())
            a, b = start // BLOCKSIZE, -(-end // BLOCKSIZE)
            adamw8bit_update_(p[start:end], g[start:end], m_codes[start:end], m_absmax[a:b], v_codes[start:end],
                              v_absmax[a:b], backend=self.backend, **hp)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor comes back with its saved dtype, where this optimizer keeps it."""
        pairs = [(p, {name: local_state(name, value, p, part_of(p)) for name, value in saved.items()}
                  if isinstance(p, DTensor) else saved) for p, saved in loaded_pairs(self, state_dict)]
        layouts = [(p, {name: (tuple(t.shape), t.dtype) for name, t in saved.items() if isinstance(t, Tensor)})
                   for p, saved in pairs]
        for (p, saved), fresh in zip(pairs, self._allocate(layouts)):
            for name, t in fresh.items():
                t.copy_(saved[name])
            self.state[p] = {name: fresh.get(name, value) for name, value in saved.items()}

    def state_dict(self) -> dict:
        """As torch's; under FSDP2 every state is gathered whole (every rank must call), as one process has it."""
        return gather_states(self, super().state_dict())

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (the memory this optimizer adds to training)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, Tensor))
