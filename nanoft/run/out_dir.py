"""One run per out_dir, and never a run over someone's checkpoint.

    owner = claim(cfg, argv)     # this process owns out_dir until it exits; refuses to start over a checkpoint

Ownership is an advisory `flock` on out_dir/.lock: the kernel drops it when the process ends, however it
ends (kill -9 included), so a crashed run never leaves the directory locked. Checkpoints themselves refuse
non-finite weights (`nanoft.run.checkpoint.save`), so a diverged model can never replace a good one.
"""
from __future__ import annotations

import fcntl
import os
import shlex
from pathlib import Path

from nanoft.run import checkpoint
from nanoft.run.checkpoint import CheckpointError
from nanoft.run.distributed import launched_rank

LOCK_NAME = ".lock"


def lock_dir(path: str | Path, what: str):
    """Hold an exclusive lock on directory `path` (created if needed) for as long as the returned file stays
    open; another process gets a one-line CheckpointError naming the holder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    f = open(path / LOCK_NAME, "a+")  # noqa: SIM115 (held open: the lock lives as long as it). Not "w": truncating would erase the holder's line before we know we own it
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise CheckpointError(f"{path} is in use by {holder}; wait for it to finish, or pick another out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} ({what})\n")
    f.flush()
    return f


def claim(cfg, argv: list[str]):
    """Refuse a run that would replace someone's checkpoint; then lock out_dir (rank 0 only, the one that
    writes). Every rank makes the same checks, so under torchrun they all stop together."""
    out, init = Path(cfg.out_dir), cfg.init_from
    if init not in ("scratch", "resume") and Path(init).resolve() in (out.resolve(), *out.resolve().parents):
        raise CheckpointError(f"init_from={init} is the out_dir {out} (or holds it): a run never writes into "
                              "the checkpoint it starts from; pick another out_dir")
    if init != "resume" and checkpoint.exists(out) and not cfg.overwrite:
        cmd = shlex.join(["python", "train.py", *[a for a in argv if not a.startswith("--init_from=")], "--init_from=resume"])
        raise CheckpointError(f"{out} already holds a checkpoint (step {_committed_step(out)}); continue it with "
                              f"`{cmd}`, or replace it with --overwrite=True")
    if launched_rank() != 0:
        return None
    return lock_dir(out, f"train.py, {init}")


def _committed_step(out_dir: Path):
    try:
        return checkpoint.read_meta(out_dir)["step"]
    except CheckpointError:
        return "?"


def check_output_dir(out: str | Path, inputs: list[str | Path], overwrite: bool) -> None:
    """For commands that read checkpoints and write one: never into an input, never over a checkpoint
    unless asked."""
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents:
            raise CheckpointError(f"--out {out} is (or is inside) the input {src}; a command never writes into "
                                  "a directory it reads; pick another --out")
    if checkpoint.exists(out) and not overwrite:
        raise CheckpointError(f"--out {out} already holds a checkpoint; pick another directory, or pass --overwrite")
