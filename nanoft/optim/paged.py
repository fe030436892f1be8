"""Paged AdamW, 32-bit and 8-bit: optimizer states live in host memory and visit the device a page at a time.

Between steps the optimizer holds no device memory beyond the states of tensors smaller than
`min_paged_size` (4096 elements: biases and LayerNorms, 0.73 MB for the 100M model), which stay on the device and
are updated as in AdamW8bit. Everything else sits in one host buffer (the arena), page-locked when CUDA exists
so that copies run asynchronously. Each step walks one flat list of (parameter, page of `page_size` elements)
over all paged parameters -- the 100M model's matrices are mostly one page each, so prefetching within a
parameter alone would overlap nothing -- through three device page buffers and three CUDA streams:

    copy page i+1's states host -> device      (H2D stream)      \
    update page i: the same AdamW maths        (compute stream)   } overlapped on CUDA
    copy page i-1's states device -> host      (D2H stream)      /

Events order each page's three stages, and each buffer's next fill waits for its previous write-back, all on
the GPU: the CPU never waits during a step. It waits only where it reads the host states (`state_dict`,
`load_state_dict`, `synchronize`); the next step's first copy waits (on the GPU) for this step's last
write-back. The three buffers are allocated per step and handed back to PyTorch's allocator with
`record_stream`, so it reuses them only after the write-backs that read them have finished.

The arena is one allocation carved into every paged parameter's states, pinned in place with cudaHostRegister.
`pin_memory()` per state would copy each into PyTorch's caching host allocator, which rounds every block up to
a power of two (up to twice the host memory); the arena is exactly the states' size.

bitsandbytes' paged optimizers reach the same end differently: CUDA unified memory that the driver pages on
demand (and leaves on the GPU while it fits). Explicit pages need no driver support and make the traffic
visible here in a few lines.

AdamW is elementwise, so updating a tensor page by page gives exactly the bits of updating it whole: the
results are those of AdamW8bit (8-bit) and of torch.optim.AdamW (32-bit; fused on CUDA). On a machine without
CUDA the host is the device: the pages are updated in place in the arena and there is nothing to copy; the
same page loop runs, which is how the tests exercise the chunking.

For 8-bit states a page must cover whole quantization blocks, so page_size is a multiple of 256.
Under FSDP2 a rank's shard of a paged state stays in the arena and visits the device whole for its update
(AdamW8bit._apply_sharded; no copy on a CPU-only machine), since its 8-bit blocks are completed across ranks.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor

from nanoft.kernels.adamw8bit import BLOCKSIZE
from nanoft.optim.adamw8bit import AdamW8bit, Layout

HOST = torch.device("cpu")
SLOTS = 3  # device page buffers: one being filled, one being updated, one being written back
ALIGN = 256  # bytes: device page views start aligned (Triton compiles a kernel variant per pointer alignment)


def _page(states: dict[str, Tensor], start: int, end: int) -> dict[str, Tensor]:
    """Views of elements [start, end) of flat states; absmax vectors are sliced by block (start is aligned)."""
    out = {}
    for name, t in states.items():
        if name.endswith("_absmax"):
            out[name] = t[start // BLOCKSIZE: -(-end // BLOCKSIZE)]
        else:
            out[name] = t[start:end]
    return out


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _unpin(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def pin_in_place(t: Tensor) -> None:
    """Page-lock the host memory behind `t` without copying it; it is unpinned when that memory is freed."""
    storage = t.untyped_storage()
    err = int(torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of {storage.nbytes()} bytes failed with CUDA error {err}")
    # torch keeps one Python object per live storage: the callback runs when the last view of it dies, before
    # the memory is freed. Not at exit, where the CUDA context may already be gone.
    weakref.finalize(storage, _unpin, storage.data_ptr()).atexit = False


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit whose states live in host memory, but for tensors of fewer than `min_paged_size` elements."""

    page_multiple = BLOCKSIZE  # a page holds whole quantization blocks
    paged = True  # the states live in host memory (memory estimates and measurements count them there)

    @classmethod
    def from_config(cls, groups: list[dict], cfg) -> torch.optim.Optimizer:
        return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, min_8bit_size=cfg.min_8bit_size,
                   page_size=cfg.page_size)

    @staticmethod
    def scratch_bytes(biggest: int, page: int, device: str) -> int:
        """About three pages of 8-bit states visit the GPU at once; on a CPU the reference's temporaries of a page."""
        return 3 * 2 * page if device == "cuda" else 33 * page

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
        min_paged_size: int = 4096,
        fused: bool | None = None,
    ) -> None:
        if page_size < 1 or page_size % self.page_multiple:
            raise ValueError(f"page_size must be a positive multiple of {self.page_multiple}, got {page_size}")
        self.page_size = page_size
        self.min_paged_size = min_paged_size
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}  # (H2D, D2H)
        self._written_back: dict[torch.device, torch.cuda.Event] = {}  # the last page write-back per device
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         min_8bit_size=min_8bit_size, backend=backend, fused=fused)

    def is_paged(self, p: Tensor) -> bool:
        """Whether p's states live in host memory (else on p's device, as AdamW8bit keeps them)."""
        return p.numel() >= self.min_paged_size

    def _allocate(self, layouts: list[tuple[Tensor, Layout]]) -> list[dict[str, Tensor]]:
        """Small parameters' states beside them; all the others carved out of one new host arena."""
        out = super()._allocate([(p, layout if not self.is_paged(p) else {}) for p, layout in layouts])
        wanted = [(i, name, shape, dtype) for i, (p, layout) in enumerate(layouts) if self.is_paged(p)
                  for name, (shape, dtype) in layout.items()]
        if not wanted:
            return out
        # widest dtype first: every offset is then a multiple of its tensor's element size, with no padding,
        # so the arena is exactly the states' bytes (nanoft.tools.memory.command counts it to the byte)
        wanted.sort(key=lambda w: -w[3].itemsize)
        sizes = [torch.Size(shape).numel() * dtype.itemsize for _, _, shape, dtype in wanted]
        arena = torch.zeros(sum(sizes), dtype=torch.uint8, device=HOST)
        if sum(sizes) and any(p.is_cuda for p, _ in layouts):  # (cudaHostRegister refuses 0 bytes)
            pin_in_place(arena)
        carved, offset = {}, 0
        for (i, name, shape, dtype), size in zip(wanted, sizes):
            carved[i, name] = arena[offset: offset + size].view(dtype).view(shape)
            offset += size
        for i, (p, layout) in enumerate(layouts):
            if self.is_paged(p):
                out[i] = {name: carved[i, name] for name in layout}
        return out

    # --- the step ---

    def _apply(self, work: list[tuple[Tensor, Tensor, dict, dict]]) -> None:
        super()._apply([w for w in work if not self.is_paged(w[0])])  # device-resident states
        pages: dict[torch.device, list] = {}  # per device, in order: (p, grad, host states, step, group) of a page
        for p, g, state, group in work:
            if not self.is_paged(p):
                continue
            host = {name: t.view(-1) for name, t in state.items() if isinstance(t, Tensor)}
            p_flat, g_flat, n = p.view(-1), g.view(-1), p.numel()
            for start in range(0, n, self.page_size):
                end = min(start + self.page_size, n)
                pages.setdefault(p.device, []).append(
                    (p_flat[start:end], g_flat[start:end], _page(host, start, end), state["step"], group))
        for device, device_pages in pages.items():
            if device.type == "cuda":
                self._pipeline(device, device_pages)
            else:  # host and device are one memory: update the arena in place, nothing to copy
                for page in device_pages:
                    self._update_flat(*page)

    def _pipeline(self, device: torch.device, pages: list) -> None:
        """Stream the pages through SLOTS device buffers: copy in, update, copy out (module docstring)."""
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        h2d, d2h = self._streams[device]
        compute = torch.cuda.current_stream(device)
        # where each state of a page sits in its slot: byte offsets aligned to ALIGN
        layouts, slot_bytes = [], 0
        for _, _, host, _, _ in pages:
            offsets, size = {}, 0
            for name, t in host.items():
                offsets[name] = size
                size += -(-_nbytes(t) // ALIGN) * ALIGN
            layouts.append(offsets)
            slot_bytes = max(slot_bytes, size)
        if device in self._written_back:  # last step's write-backs must land before their pages are read again
            h2d.wait_event(self._written_back[device])
        with torch.cuda.stream(h2d):  # allocated on the stream that first writes it
            ring = torch.empty((SLOTS, slot_bytes), dtype=torch.uint8, device=device)
        slot_free: list[torch.cuda.Event | None] = [None] * SLOTS  # a slot's last write-back finished

        def fetch(i: int) -> tuple[dict[str, Tensor], torch.cuda.Event]:
            """Queue page i's host -> device copies into slot i % SLOTS; return its device views and their event."""
            slot, host = ring[i % SLOTS], pages[i][2]
            with torch.cuda.stream(h2d):
                if slot_free[i % SLOTS] is not None:
                    h2d.wait_event(slot_free[i % SLOTS])  # the page before in this slot has been written back
                views = {}
                for name, t in host.items():
                    at = layouts[i][name]
                    views[name] = slot[at: at + _nbytes(t)].view(t.dtype)
                    views[name].copy_(t, non_blocking=True)
                return views, h2d.record_event()

        upcoming = fetch(0)
        for i, (p, g, host, step, group) in enumerate(pages):
            views, ready = upcoming
            if i + 1 < len(pages):
                upcoming = fetch(i + 1)  # prefetch the next page while this one computes
            compute.wait_event(ready)
            self._update_flat(p, g, views, step, group)  # on the compute stream, in the slot
            updated = compute.record_event()
            with torch.cuda.stream(d2h):
                d2h.wait_event(updated)
                for name, t in host.items():
                    t.copy_(views[name], non_blocking=True)  # device -> host, behind the next page's compute
                slot_free[i % SLOTS] = d2h.record_event()
        # D2H is in order, so its last event covers every write-back of this step
        self._written_back[device] = slot_free[(len(pages) - 1) % SLOTS]
        # the ring goes back to the allocator now; it reuses the memory only once the compute and D2H work
        # queued so far has finished
        ring.record_stream(compute)
        ring.record_stream(d2h)

    # --- reading and writing the host states ---

    def synchronize(self) -> None:
        """Wait until every queued write-back has reached host memory. state_dict and load_state_dict call this;
        call it before reading `optimizer.state` directly on CUDA."""
        for event in self._written_back.values():
            event.synchronize()

    def state_dict(self) -> dict:
        self.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.synchronize()  # no copy may still be reading or writing the states about to be replaced
        super().load_state_dict(state_dict)

    def __del__(self) -> None:
        # the arena may be freed with us: no copy into it may still be in flight
        try:
            self.synchronize()
        except Exception:  # noqa: BLE001, S110 (interpreter shutdown: CUDA may be gone already)
            pass


class PagedAdamW(PagedAdamW8bit):
    """AdamW with float32 states in host memory, paged to the device each step: torch.optim.AdamW's results
    (fused=True's on CUDA, the default's on the CPU)."""

    page_multiple = 1  # 32-bit states have no blocks: any page size works
    nominal_bytes_per_param = 8.0  # float32 m and v
    loss_tolerance = 1e-3  # python -m nanoft check: AdamW page by page, the same bits

    @classmethod
    def from_config(cls, groups: list[dict], cfg) -> torch.optim.Optimizer:
        return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, page_size=cfg.page_size)

    @staticmethod
    def tensor_state_bytes(shape: tuple[int, ...], elem: int, cfg) -> int:
        """float32 exp_avg and exp_avg_sq; the step count is a Python int."""
        return 2 * math.prod(shape) * 4

    @staticmethod
    def scratch_bytes(biggest: int, page: int, device: str) -> int:
        """About three pages of float32 states visit the GPU at once; on a CPU two float32 copies of a page."""
        return 3 * 8 * page if device == "cuda" else 2 * 4 * page

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        page_size: int = 1 << 20,
        min_paged_size: int = 4096,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, page_size=page_size,
                         min_paged_size=min_paged_size, fused=fused)

    def uses_8bit(self, p: Tensor) -> bool:
        return False
