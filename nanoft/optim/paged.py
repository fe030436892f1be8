"""Paged AdamW, 32-bit and 8-bit: optimizer states live in host memory and visit the device a page at a time.

Between steps the optimizer holds no device memory at all: m and v (or their 8-bit codes and absmax) sit in
host RAM, pinned when CUDA exists so that copies can run asynchronously. For each parameter, each step walks
its flat elements in pages of `page_size`:

    fetch page i+1's states host -> device       (side stream)      \
    update page i: the same AdamW maths          (main stream)       } overlapped on CUDA
    write page i-1's states device -> host       (side stream)      /

so at most about three pages of state are on the device at once, and the copies hide behind the compute.
bitsandbytes' paged optimizers reach the same end differently: CUDA unified memory that the driver pages on
demand. Explicit pages need no driver support and make the traffic visible here in a few lines.

AdamW is elementwise, so updating a tensor page by page gives exactly the bits of updating it whole: the
results are those of AdamW8bit (8-bit) and of torch.optim.AdamW (32-bit). On a machine without CUDA the host
is the device: `.to(device)` returns the host tensor itself, the update writes the states in place and there
is nothing to copy back; the same page loop runs, which is how the tests exercise the chunking.

For 8-bit states a page must cover whole quantization blocks, so page_size is a multiple of 256.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor

from nanoft.kernels.adamw8bit import BLOCKSIZE
from nanoft.optim.adamw8bit import AdamW8bit

HOST = torch.device("cpu")


def _page(states: dict[str, Tensor], start: int, end: int) -> dict[str, Tensor]:
    """Views of elements [start, end) of flat states; absmax vectors are sliced by block (start is aligned)."""
    out = {}
    for name, t in states.items():
        if name.endswith("_absmax"):
            out[name] = t[start // BLOCKSIZE: -(-end // BLOCKSIZE)]
        else:
            out[name] = t[start:end]
    return out


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit whose states (8-bit codes and absmax, and the 32-bit states of small tensors) live on the host."""

    page_multiple = BLOCKSIZE  # a page holds whole quantization blocks

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
        page_size: int = 1 << 20,
        backend: str = "auto",
    ) -> None:
        if page_size < 1 or page_size % self.page_multiple:
            raise ValueError(f"page_size must be a positive multiple of {self.page_multiple}, got {page_size}")
        self.page_size = page_size
        self._side_streams: dict = {}  # CUDA device -> the stream that carries the page copies
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         min_8bit_size=min_8bit_size, backend=backend)

    def state_device(self, p: Tensor) -> torch.device:
        return HOST

    def _pinned(self, p: Tensor, t: Tensor) -> Tensor:
        # page-locked memory lets the copies run asynchronously (pageable memory would serialise them)
        return t.pin_memory() if p.is_cuda else t

    def _zeros(self, p: Tensor, shape: tuple | torch.Size, dtype: torch.dtype) -> Tensor:
        return self._pinned(p, torch.zeros(shape, dtype=dtype, device=HOST))

    def _place_loaded(self, p: Tensor, saved: Tensor) -> Tensor:
        return self._pinned(p, saved.to(device=HOST, copy=True))

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        return self._side_streams[device]

    def _finish_step(self) -> None:
        # the last pages' write-backs are still in flight: wait for them, so the host states are complete when
        # read (state_dict, checkpoint) and the page buffers are released. One CPU-GPU sync point per step.
        for stream in self._side_streams.values():
            stream.synchronize()

    def _update(self, p: Tensor, g: Tensor, state: dict, group: dict) -> None:
        host = {name: t.view(-1) for name, t in state.items() if isinstance(t, Tensor)}
        p_flat, g_flat = p.view(-1), g.view(-1)
        n = p_flat.numel()
        cuda = p.is_cuda
        side = self._side_stream(p.device) if cuda else None
        main = torch.cuda.current_stream(p.device) if cuda else None

        def on_side():
            return torch.cuda.stream(side) if cuda else contextlib.nullcontext()

        def fetch(start: int) -> tuple[dict[str, Tensor], object]:
            """Queue the host -> device copies of one page's states; return them and an event marking them done."""
            with on_side():
                page = {name: t.to(p.device, non_blocking=True)  # on CPU: the host view itself, no copy
                        for name, t in _page(host, start, min(start + self.page_size, n)).items()}
                ready = side.record_event() if cuda else None
            return page, ready

        upcoming = fetch(0)
        for start in range(0, n, self.page_size):
            end = min(start + self.page_size, n)
            page, ready = upcoming
            if end < n:
                upcoming = fetch(end)  # prefetch the next page while this one computes
            if cuda:
                main.wait_event(ready)
            self._update_flat(p_flat[start:end], g_flat[start:end], page, state["step"], group)
            if not cuda:
                continue  # the states were updated in place in host memory
            done = main.record_event()
            host_page = _page(host, start, end)
            with on_side():
                side.wait_event(done)
                for name, t in page.items():
                    host_page[name].copy_(t, non_blocking=True)  # device -> host, behind the next compute
                    t.record_stream(main)  # used on main: the allocator must not reuse it before that finishes


class PagedAdamW(PagedAdamW8bit):
    """AdamW with float32 states in host memory, paged to the device each step: torch.optim.AdamW's results."""

    page_multiple = 1  # 32-bit states have no blocks: any page size works

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        page_size: int = 1 << 20,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, page_size=page_size)

    def uses_8bit(self, p: Tensor) -> bool:
        return False
