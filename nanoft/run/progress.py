"""Training progress on stderr: tqdm's bar in a terminal, a plain line every few seconds anywhere else.

In a terminal tqdm redraws one line in place ("\\r" and the new text, up to ten times a second). Sent to a
file or a pipe (`2> train.log`, nohup, a job scheduler, CI), every redraw stays in the log: thousands of
half-lines that `tail` shows as one unreadable line. There `progress` returns a PlainProgress instead,
which prints one complete line every `interval` seconds and one at the end:

    step 120/300 (40%) | loss 2.345, lr 1.2e-03, tok_s 2048, mfu 0.3% | 3.10 steps/s | elapsed 0:38 | ETA 0:58

The values between the first and last bar are the latest `set_postfix` ones (train.py sets them at each log
step); steps/s and ETA are measured here, from the steps this process ran (a resumed run starts counting at
its first step).

    bar = progress(range(start, max_iters), initial=start, total=max_iters, disable=not is_master)
    for step in bar:
        ...
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.write("step 100: val loss 2.41")   # a message on stdout, as tqdm.write prints it
    bar.close()
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

INTERVAL_S = 5.0  # seconds between two plain lines: a line a few seconds old is still news, 720 lines an hour


def progress(iterable: Iterable, *, initial: int = 0, total: int | None = None, disable: bool = False,
             interval: float = INTERVAL_S, file: TextIO | None = None):
    """tqdm(iterable, ...) when `file` (default stderr) is a terminal, else a PlainProgress with the same calls."""
    file = file or sys.stderr
    if getattr(file, "isatty", lambda: False)():
        return tqdm(iterable, initial=initial, total=total, disable=disable, file=file)
    return PlainProgress(iterable, initial=initial, total=total, disable=disable, interval=interval, file=file)


class PlainProgress:
    """The part of tqdm's interface train.py uses (iterate, set_postfix, write, close), printing whole lines."""

    def __init__(self, iterable: Iterable, *, initial: int = 0, total: int | None = None, disable: bool = False,
                 interval: float = INTERVAL_S, file: TextIO | None = None):
        self.iterable, self.n, self.initial, self.total = iterable, initial, initial, total
        self.disable, self.interval, self.file = disable, interval, file or sys.stderr
        self.postfix: dict[str, object] = {}
        self.start = self.last_line_at = time.monotonic()
        self.n_at_last_line = initial

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.n += 1  # the loop body has finished this step
            if time.monotonic() - self.last_line_at >= self.interval:
                self.print_line()

    def set_postfix(self, **values) -> None:
        self.postfix = values  # as tqdm does: the new values replace the old ones

    @staticmethod
    def write(message: str) -> None:
        tqdm.write(message)  # stdout, as the terminal bar's messages go

    def line(self) -> str:
        """`step n/total (p%) | postfix | steps/s | elapsed | ETA` (the parts known so far)."""
        now = time.monotonic()
        done = f"step {self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"step {self.n}"
        parts = [done] + ([", ".join(f"{k} {v}" for k, v in self.postfix.items())] if self.postfix else [])
        rate = (self.n - self.initial) / (now - self.start) if now > self.start else 0.0
        parts += [f"{rate:.2f} steps/s", f"elapsed {tqdm.format_interval(now - self.start)}"]
        if self.total and rate > 0:
            parts.append(f"ETA {tqdm.format_interval((self.total - self.n) / rate)}")
        return " | ".join(parts)

    def print_line(self) -> None:
        if not self.disable:
            print(self.line(), file=self.file, flush=True)  # flushed: a pipe would otherwise hold it back
        self.last_line_at, self.n_at_last_line = time.monotonic(), self.n

    def close(self) -> None:
        """The last line, unless the latest one already showed this step (tqdm's close prints the final bar too)."""
        if self.n != self.n_at_last_line:
            self.print_line()


def finite_or_none(record: dict) -> dict:
    """NaN and inf become null: metrics.jsonl stays strict JSON that any reader accepts."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
