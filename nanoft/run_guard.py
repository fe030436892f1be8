"""What keeps a run from destroying a good checkpoint: ownership of out_dir, divergence, changed resumes, Ctrl-C.

    owner = claim(cfg, argv)            # this process owns out_dir until it exits; refuses to start over a checkpoint
    check_resume(resume, cfg)           # --init_from=resume: print what changed, refuse what cannot change
    guard = StepGuard(cfg.max_bad_steps, scaler.is_enabled(), dist)
    stop = StopRequest(dist)            # Ctrl-C sets stop.requested
    if guard.ok(loss, grad_norm, step, stop.requested): optimizer.step()   # a non-finite loss or gradient skips it
    if guard.stop: ...                  # end of the step: a rank was asked to stop; save, exit 130

Ownership is an advisory `flock` on out_dir/.lock: the kernel drops it when the process ends, however it
ends (kill -9 included), so a crashed run never leaves the directory locked. Checkpoints themselves refuse
non-finite weights (`nanoft.checkpoint.save`), so a diverged model can never replace a good one.
"""
from __future__ import annotations

import fcntl
import math
import os
import shlex
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanoft import checkpoint, distributed
from nanoft.checkpoint import CheckpointError

LOCK_NAME = ".lock"


# --- ownership of out_dir ----------------------------------------------------------------------------

def lock_dir(path: str | Path, what: str):
    """Hold an exclusive lock on directory `path` (created if needed) for as long as the returned file stays
    open; another process gets a one-line CheckpointError naming the holder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    f = open(path / LOCK_NAME, "a+")  # not "w": truncating would erase the holder's line before we know we own it
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
    if distributed.launched_rank() != 0:
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


# --- resuming with a changed config ------------------------------------------------------------------

# keys a resumed run cannot change, and why; the model's shape (checkpoint.SHAPE_KEYS) cannot change either
REFUSED_ON_RESUME = {
    "optimizer": "the saved optimizer state belongs to the optimizer that wrote it",
    "min_8bit_size": "it decides which optimizer states are stored in 8 bits",
    "lora_alpha": "it scales the trained adapter, so it would change the model",
    "dataset": "the saved data position indexes the old data",
    "sft_data": "the saved data position indexes the old examples",
    "preference_data": "the saved data position indexes the old pairs",
}
# keys that may change but end bit-exactness with an uninterrupted run
GEOMETRY = ("batch_size", "grad_accum", "seed", "dropout", "lora_dropout")
NOT_COMPARED = ("init_from", "out_dir", "overwrite")  # where the run is, not what it trains


def check_resume(resume: checkpoint.Checkpoint, cfg) -> None:
    """Refuse a resume whose config changes what cannot change (one line naming the key); print what
    changes. Optimizer hyperparameters (lr, weight_decay, betas, eps) take this config's values:
    `distributed.load_optimizer_state` keeps them over the saved ones."""
    where = cfg.out_dir
    checkpoint.check_compatible(resume.config, cfg.to_dict(), where, checkpoint.SHAPE_KEYS)
    now = cfg.to_dict()
    for key, why in REFUSED_ON_RESUME.items():
        if key in resume.config and _norm(resume.config[key]) != _norm(now[key]):
            raise CheckpointError(f"checkpoint {where} was trained with {key}={resume.config[key]!r}; resuming with "
                                  f"{key}={now[key]!r} is refused ({why}); start a new run from it instead: "
                                  f"--init_from={where} --out_dir=<another dir>")
    check_adapter_base(resume, where)
    changed = [k for k in now if k in resume.config and k not in NOT_COMPARED + checkpoint.SHAPE_KEYS
               and _norm(resume.config[k]) != _norm(now[k])]
    if changed and distributed.launched_rank() == 0:
        print("resume: " + ", ".join(f"{k} {resume.config[k]!r} -> {now[k]!r}" for k in changed) + " (applied)")
        if any(k in GEOMETRY for k in changed):
            print("resume: batch geometry, seed or dropout changed: the run goes on from the same data position, "
                  "but is no longer bit-exact with an uninterrupted run")


def _norm(value):
    return tuple(value) if isinstance(value, list) else value


def resumed_position(resume: checkpoint.Checkpoint, cfg, world_size: int) -> dict:
    """The training data position for this run. Positions count global batches of batch_size * world_size
    rows; when that changed, convert so the run continues at the same row (token window or example)."""
    state = dict(resume.data["train"])
    saved_world = resume.data.get("world_size")  # recorded since this check exists; older checkpoints: trust
    if saved_world is None:
        return state
    old_rows, new_rows = resume.config["batch_size"] * saved_world, cfg.batch_size * world_size
    if old_rows == new_rows:
        return state
    rows_done = state["position"] * old_rows
    state["position"], again = divmod(rows_done, new_rows)
    if distributed.launched_rank() == 0:
        print(f"resume: global batch {old_rows} -> {new_rows} rows: continuing after row {rows_done - again:,} of "
              f"{rows_done:,} drawn" + (f" ({again} rows drawn again)" if again else ""))
    return state


# --- an adapter knows its base by content ------------------------------------------------------------

def base_identity(base_from: str) -> dict:
    """{"path": absolute path, "sha256": of the base's tensor file}: for a nanoft checkpoint, the sha256
    its ckpt.json already records; for a .safetensors file, hashed here (cached by path, size and mtime)."""
    path = Path(base_from).resolve()
    if path.is_dir():
        return {"path": str(path), "sha256": checkpoint.read_meta(path)["sha256"]}
    stat = path.stat()
    return {"path": str(path), "sha256": _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)}


_SHA_CACHE: dict = {}


def _file_sha256(path: str, size: int, mtime: int) -> str:
    key = (path, size, mtime)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = checkpoint.sha256_file(Path(path))
    return _SHA_CACHE[key]


def check_adapter_base(ckpt: checkpoint.Checkpoint, where: str, base: str | None = None) -> None:
    """Refuse to apply an adapter to a base other than the one it was trained on (same path or not)."""
    recorded = ckpt.extra.get("adapter", {}).get("base_sha256")
    if not recorded:
        return  # not an adapter, or one saved before bases were recorded
    base = base or ckpt.base_from
    try:
        got = base_identity(base)["sha256"]
    except (OSError, CheckpointError) as e:
        raise CheckpointError(f"adapter {where} needs its base {base}, which cannot be read: {e}") from None
    if got != recorded:
        raise CheckpointError(f"adapter {where} was trained on a base with sha256 {recorded[:12]}..., but {base} "
                              f"has {got[:12]}... (it changed, or is another model); refusing to apply it")


# --- steps with a non-finite loss or gradient ---------------------------------------------------------

class Diverged(ValueError):
    """Too many steps in a row had a non-finite loss or gradient norm."""


class StepGuard:
    """Skips optimizer steps whose loss or gradient norm is NaN or inf, and stops the run after
    max_bad_steps of them in a row (the weights are still the last good ones: skipped steps change nothing).

    With fp16's GradScaler an infinite gradient is routine (the loss scale was too high): the scaler skips
    that step and lowers its scale in `scaler.update()`, which still runs. Those count as skipped, but only a
    non-finite *loss* counts towards stopping. Costs one device-to-host sync per step (and, under torchrun,
    one small all-reduce so that every rank skips the same steps). The same all-reduce carries Ctrl-C's
    request (StopRequest): `stop` is then True on every rank alike, so all of them stop after the same step."""

    def __init__(self, max_bad_steps: int, fp16_scaler: bool, dist: distributed.Dist):
        self.max_bad_steps, self.fp16_scaler, self.dist = max_bad_steps, fp16_scaler, dist
        self.skipped = 0  # steps skipped so far in this process (logged as "skipped")
        self.in_a_row = 0
        self.stop = False  # some rank was asked to stop (Ctrl-C) by the last call

    def ok(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, stop_requested: bool = False) -> bool:
        if hasattr(grad_norm, "full_tensor"):  # fsdp: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        bad_loss = (~torch.isfinite(loss.detach().float())).float()
        bad_grad = (~torch.isfinite(grad_norm.detach().float())).float().to(bad_loss.device)
        stop = torch.tensor(float(stop_requested), device=bad_loss.device)
        *flags, stop = distributed.mean_across_ranks(torch.stack([bad_loss, bad_grad, stop]), self.dist).tolist()
        self.stop = stop > 0
        if not any(flags):
            self.in_a_row = 0
            return True
        self.skipped += 1
        if flags[0] or not self.fp16_scaler:
            self.in_a_row += 1
        if self.dist.is_master:
            tqdm.write(f"step {step}: non-finite {'loss' if flags[0] else 'gradient norm'}, step skipped "
                       f"({self.in_a_row} in a row, {self.skipped} in all)")
        if self.in_a_row >= self.max_bad_steps:
            raise Diverged(f"training diverged: {self.in_a_row} steps in a row up to step {step} had a non-finite "
                           f"{'loss' if flags[0] else 'gradient norm'} and were skipped (max_bad_steps="
                           f"{self.max_bad_steps}); the last checkpoint is kept; lower lr or check the data")
        return False


# --- Ctrl-C: stop between steps ---------------------------------------------------------------------------

class StopRequest:
    """Ctrl-C (SIGINT) asks the run to stop at the end of a step; train.py then saves a checkpoint and exits
    with 130. A KeyboardInterrupt raised mid-step would land anywhere: inside the optimizer's loop over
    parameters (some updated, some not), or after the update but before the loop counts the step, and the
    checkpoint saved then would be the state of no step (a resume would apply a step twice).

    Under torchrun every rank must stop after the same step, since saving is collective (FSDP gathers, the RNG
    states are gathered): StepGuard.ok all-reduces the request with its own flags, so a request made after that
    point ends the next step instead, and costs no collective of its own. Ctrl-C in a terminal
    reaches torchrun and every worker, and torchrun passes it on, so a repeated SIGINT changes nothing here;
    Ctrl-\\ (SIGQUIT) or kill -9 stop at once, and the last checkpoint on disk stays as it is. torchrun kills its
    workers --shutdown_timeout seconds (30 by default) after passing SIGINT on: a run whose step, evaluation and
    save take longer needs a larger one, or it ends without the new checkpoint (the last one stays whole)."""

    def __init__(self, dist: distributed.Dist) -> None:
        self.dist, self.requested = dist, False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        first, self.requested = not self.requested, True
        if first and self.dist.is_master:  # os.write: a print here could re-enter one in progress
            try:
                os.write(sys.stderr.fileno(), b"\nCtrl-C: stopping at the end of this step, with a checkpoint\n")
            except OSError:  # stderr closed (a pipe's reader gone): the request stands, unannounced
                pass

    def close(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


def finite_or_none(record: dict) -> dict:
    """NaN and inf become null: metrics.jsonl stays strict JSON that any reader accepts."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


# --- token files -------------------------------------------------------------------------------------

def check_token_files(data_dir: Path, vocab_size: int) -> Path:
    """Each .bin holds whole uint16 ids below vocab_size; otherwise one line naming the file. Reads the
    files once (a few seconds per GB), much cheaper than an index error or a CUDA assert mid-run."""
    for name in ("train.bin", "val.bin"):
        path = Path(data_dir) / name
        size = path.stat().st_size
        if size % 2:
            raise ValueError(f"{path} has {size} bytes, an odd number: not a file of uint16 token ids "
                             "(truncated or not written by data/prepare.py)")
        if size:
            top = int(np.memmap(path, dtype=np.uint16, mode="r").max())
            if top >= vocab_size:
                raise ValueError(f"{path} holds token id {top}, beyond vocab_size={vocab_size} (another "
                                 "tokenizer's data?)")
    return Path(data_dir)
