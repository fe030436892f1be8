"""Splitting a C kernel's work over threads: the CPU kernels (nf4_cpu.py, cross_entropy_cpu.py) call into C
with ctypes, which releases the GIL, so Python threads run their ranges truly in parallel.

The worker threads live as long as the process: starting threads on every call cost more than a small
call's whole work (a 768x768 NF4 dequantize takes ~0.2 ms). A forked child has none of its parent's threads,
so the pool is remade there.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_POOL: list = []  # [ThreadPoolExecutor, the pid that started it]


def in_threads(work: Callable[[int, int, int], None], n: int, threads: int) -> None:
    """work(part, first, last) for `threads` contiguous ranges of range(n) (part = 0, 1, ...); this thread runs
    part 0, the pool the others; returns when all are done (re-raising the first error)."""
    threads = max(1, min(threads, n))
    if threads == 1:
        work(0, 0, n)
        return
    cuts = [n * t // threads for t in range(threads + 1)]
    if not _POOL or _POOL[1] != os.getpid() or _POOL[0]._max_workers < threads - 1:
        _POOL[:] = [ThreadPoolExecutor(threads - 1, thread_name_prefix="nanoft-kernel"), os.getpid()]
    others = [_POOL[0].submit(work, t, cuts[t], cuts[t + 1]) for t in range(1, threads)]
    work(0, cuts[0], cuts[1])
    for future in others:
        future.result()
