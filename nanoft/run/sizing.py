"""Before a long run starts: is it sized for this machine, and is its schedule shorter than its warmup?

`python train.py configs/100m.py` on a CPU is 2e16 FLOPs of model maths: at a 2-core CPU's best matmul speed
(~0.4 TFLOP/s in bf16) that is 14 hours even at 100% utilisation, and in practice 36-49. Nothing is wrong with
such a run, but a user should hear it before the first step, not from an ETA after it, with the config that
trains in minutes here. The estimate at the start is a lower bound (peak speed); the one after the first steps
is what this machine measured.
"""
from __future__ import annotations

import time

from nanoft.config import Config
from nanoft.optim.schedule import warmup_cosine

GPU_SIZED_SECONDS = 3600  # a run that cannot finish in an hour at the CPU's peak speed is sized for a GPU
SMALL_CONFIG = "configs/tiny.py"  # what trains in minutes on a laptop CPU


class GpuSizedNotice:
    """On a CPU, for a run sized for a GPU: `opening()` says so at the start, `step_done(step)` once after the
    first timed steps (the first is left out: it includes start-up) says how long the rest will take here."""

    TIMED_STEPS = 2

    def __init__(self, device: str, run_flops: float, peak_flops: float, config: str) -> None:
        self.active = device == "cpu" and run_flops / peak_flops > GPU_SIZED_SECONDS
        self.hours_at_peak = run_flops / peak_flops / 3600
        self.config = config
        self._started: float | None = None
        self._steps = 0

    def opening(self) -> str:
        return (f"note: {self.config} is sized for a GPU: on this CPU it takes at least {self.hours_at_peak:.1f} h (its "
                f"model maths at the CPU's best matmul speed); {SMALL_CONFIG} trains in minutes here. The time "
                f"measured over the first steps follows.")

    def step_done(self, step: int, max_iters: int) -> str | None:
        """Called after every step; returns the measured estimate once, then None."""
        if not self.active:
            return None
        if self._started is None:
            self._started = time.perf_counter()  # after the first step: start-up is not a step's cost
            return None
        self._steps += 1
        if self._steps < self.TIMED_STEPS:
            return None
        self.active = False
        per_step = (time.perf_counter() - self._started) / self._steps
        return (f"measured: {per_step:.1f} s a step on this CPU, so the remaining {max_iters - step:,} steps take about "
                f"{per_step * (max_iters - step) / 3600:.1f} h")


def warmup_notice(cfg: Config) -> str | None:
    """One line for a run that ends inside its warmup (a smoke run of a few steps, say): it runs, and the learning
    rate stops on its way to the peak lr, as nanoGPT's and transformers' schedules do."""
    if cfg.warmup_iters <= cfg.max_iters:
        return None
    top = warmup_cosine(cfg.max_iters - 1, warmup_iters=cfg.warmup_iters, max_iters=cfg.max_iters, lr=cfg.lr,
                        min_lr=cfg.min_lr)
    return (f"note: the run ends inside its warmup (max_iters={cfg.max_iters} < warmup_iters={cfg.warmup_iters}): "
            f"the learning rate rises to {top:.2e}, not to its peak lr={cfg.lr:.2e}")
