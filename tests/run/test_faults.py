"""Nothing lost: divergence, re-runs, concurrent runs, changed resumes, bad input and a full disk never
destroy a good checkpoint, and each ends in one line naming what is wrong.

Real parts throughout: train.py and the commands run in subprocesses, a rival run is a second process
on the same out_dir, kill -9 is a real SIGKILL, and a full disk is a real write failure (a file-size limit,
RLIMIT_FSIZE, makes write() fail with EFBIG exactly where a full disk fails with ENOSPC).
"""
import dataclasses
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import torchrun

from nanoft.config import Config
from nanoft.data.tokens import DATA_ROOT
from nanoft.model.gpt import GPT
from nanoft.peft.lora_model import adapter_config, adapter_state_dict, apply_lora
from nanoft.run import checkpoint
from nanoft.run.checkpoint import Checkpoint, CheckpointError

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
         "--warmup_iters=2", "--lr=3e-3", "--device=cpu"]


def train_cmd(out_dir, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "configs/tiny.py", f"--out_dir={out_dir}", *SMALL, *extra]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def train(out_dir, *extra: str) -> subprocess.CompletedProcess:
    r = run(train_cmd(out_dir, *extra))
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def last_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and lines and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[-1]


def strict_records(out_dir) -> list[dict]:
    """metrics.jsonl as a strict JSON reader sees it: a bare NaN or Infinity is an error."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return [json.loads(line, parse_constant=refuse) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


# --- 1. NaN / inf --------------------------------------------------------------------------------------

def test_divergence_skips_steps_then_stops_and_keeps_the_good_checkpoint(tmp_path):
    train(tmp_path, "--max_iters=4", "--save_interval=4", "--eval_interval=4")
    r = run(train_cmd(tmp_path, "--init_from=resume", "--lr=1e6", "--max_iters=40", "--log_interval=1",
                      "--eval_interval=2", "--save_interval=2", "--max_bad_steps=3"))
    assert last_line(r).startswith("error: training diverged: 3 steps in a row up to step ")
    assert "step skipped (1 in a row" in r.stderr + r.stdout
    records = strict_records(tmp_path)  # raises on a bare NaN
    assert records[-1]["skipped"] >= 1
    ckpt = checkpoint.load(tmp_path)  # loadable, and every tensor in it finite
    assert all(torch.isfinite(v).all() for v in ckpt.model.values())
    assert ckpt.step >= 4 and not list(tmp_path.glob("*.tmp"))


def test_a_non_finite_model_is_never_written_over_a_checkpoint(tmp_path):
    cfg = Config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64)
    model = GPT(cfg)
    checkpoint.save(tmp_path, Checkpoint(step=1, config=cfg.to_dict(), model=model.state_dict()))
    before = files(tmp_path)
    with torch.no_grad():
        model.blocks[0].mlp.fc_in.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save step 2 .*blocks.0.mlp.fc_in.weight holds NaN or inf"):
        checkpoint.save(tmp_path, Checkpoint(step=2, config=cfg.to_dict(), model=model.state_dict()))
    assert files(tmp_path) == before


# --- 2. ownership of out_dir ---------------------------------------------------------------------------

def test_starting_over_a_checkpoint_is_refused_with_the_resume_command(tmp_path):
    train(tmp_path, "--max_iters=2", "--eval_interval=2")
    before = files(tmp_path)
    r = run(train_cmd(tmp_path, "--max_iters=2", "--eval_interval=2"))
    line = last_line(r)
    assert line.startswith(f"error: {tmp_path} already holds a checkpoint (step 2); continue it with `python train.py")
    assert "--init_from=resume`" in line and "--overwrite=True" in line
    assert files(tmp_path) == before
    train(tmp_path, "--max_iters=2", "--eval_interval=2", "--overwrite=True")  # explicit: allowed
    r = run(train_cmd(tmp_path, "--max_iters=2", f"--init_from={tmp_path}"))  # a base inside its own out_dir
    assert "a run never writes into the checkpoint it starts from" in last_line(r)


def test_one_run_at_a_time_and_kill_9_leaves_no_stale_lock(tmp_path):
    first = subprocess.Popen(train_cmd(tmp_path, "--max_iters=100000", "--log_interval=1", "--eval_interval=100000",
                                       "--save_interval=5", "--compile=False"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not checkpoint.exists(tmp_path) and time.time() < deadline:
            time.sleep(0.05)
        for extra in (["--init_from=resume"], ["--overwrite=True"]):
            r = run(train_cmd(tmp_path, "--max_iters=100000", *extra))
            assert last_line(r) == (f"error: {tmp_path} is in use by pid {first.pid} (train.py, scratch); wait for it "
                                    "to finish, or pick another out_dir")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = checkpoint.load(tmp_path).step
    train(tmp_path, f"--max_iters={step + 2}", "--init_from=resume")  # the kernel released the dead run's lock
    assert checkpoint.load(tmp_path).step == step + 2


def test_temporary_files_are_per_process_and_dead_ones_are_cleaned(tmp_path):
    cfg = Config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"ckpt.json.{dead.stdout.strip()}.tmp"  # a writer killed mid-save
    live = tmp_path / f"ckpt.json.{os.getppid()}.tmp"  # another process, still running, mid-save
    stale.write_text("{")
    live.write_text("{")
    checkpoint.save(tmp_path, Checkpoint(step=1, config=cfg.to_dict(), model=GPT(cfg).state_dict()))
    assert not stale.exists() and live.read_text() == "{"  # its tmp is not ours: left alone
    assert checkpoint.load(tmp_path).step == 1


def _adapter(tmp_path):
    """A base checkpoint and a LoRA adapter trained on it, saved as train.py saves them."""
    cfg = Config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64)
    base = GPT(cfg)
    checkpoint.save(tmp_path / "base", Checkpoint(step=1, config=cfg.to_dict(), model=base.state_dict()))
    lora_cfg = dataclasses.replace(cfg, finetune="lora", init_from=str(tmp_path / "base"), out_dir=str(tmp_path / "run"))
    model = apply_lora(base, lora_cfg)
    checkpoint.save(tmp_path / "run", Checkpoint(
        step=5, config=lora_cfg.to_dict(), model=adapter_state_dict(model), base_from=lora_cfg.init_from,
        extra={"adapter": adapter_config(lora_cfg, lora_cfg.init_from)}))
    return cfg


def merge(adapter, out, *extra) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "nanoft", "merge", "--adapter", str(adapter), "--out", str(out), *extra])


def test_merge_never_writes_into_its_inputs_or_over_a_checkpoint(tmp_path):
    _adapter(tmp_path)
    inputs = files(tmp_path / "run"), files(tmp_path / "base")
    for out in (tmp_path / "run", tmp_path / "base", tmp_path / "run" / "merged"):
        assert "a command never writes into a directory it reads" in last_line(merge(tmp_path / "run", out))
    assert (files(tmp_path / "run"), files(tmp_path / "base")) == inputs
    assert merge(tmp_path / "run", tmp_path / "merged").returncode == 0
    assert "already holds a checkpoint" in last_line(merge(tmp_path / "run", tmp_path / "merged"))
    assert merge(tmp_path / "run", tmp_path / "merged", "--overwrite").returncode == 0


# --- 7. an adapter knows its base by content -----------------------------------------------------------

def test_an_adapter_refuses_a_changed_base(tmp_path):
    cfg = _adapter(tmp_path)
    recorded = checkpoint.read_meta(tmp_path / "run")["extra"]["adapter"]
    assert recorded["base_path"] == str((tmp_path / "base").resolve()) and len(recorded["base_sha256"]) == 64
    torch.manual_seed(1)  # the base directory now holds other weights (retrained, or replaced)
    checkpoint.save(tmp_path / "base", Checkpoint(step=2, config=cfg.to_dict(), model=GPT(cfg).state_dict()))
    line = last_line(merge(tmp_path / "run", tmp_path / "merged"))
    assert line.startswith(f"error: adapter {tmp_path / 'run'} was trained on a base with sha256 ")
    assert "refusing to apply it" in line and not (tmp_path / "merged").exists()
    r = run([sys.executable, "sample.py", str(tmp_path / "run"), "--max_new_tokens=2"])
    assert "refusing to apply it" in last_line(r)


# --- 3. resuming with a changed config -----------------------------------------------------------------

def test_resume_applies_changed_hyperparameters_and_refuses_a_changed_optimizer(tmp_path):
    train(tmp_path, "--max_iters=4", "--eval_interval=4", "--weight_decay=0.1")
    r = run(train_cmd(tmp_path, "--max_iters=6", "--init_from=resume", "--optimizer=adamw8bit"))
    assert last_line(r).startswith(f"error: checkpoint {tmp_path} was trained with optimizer='adamw'; resuming with "
                                   "optimizer='adamw8bit' is refused")
    r = train(tmp_path, "--max_iters=6", "--eval_interval=6", "--init_from=resume", "--weight_decay=0.3", "--beta2=0.99")
    assert "resume: max_iters 4 -> 6, eval_interval 4 -> 6, weight_decay 0.1 -> 0.3, beta2 0.95 -> 0.99 (applied)" in r.stdout
    meta = checkpoint.read_meta(tmp_path)
    groups = meta["optim"]["param_groups"]  # what the optimizer really used
    assert {g["weight_decay"] for g in groups} == {0.3, 0.0} and all(g["betas"] == [0.9, 0.99] for g in groups)
    assert meta["config"]["weight_decay"] == 0.3 and meta["step"] == 6


def test_resume_with_another_batch_size_keeps_the_data_position_in_rows(tmp_path):
    train(tmp_path, "--max_iters=4", "--eval_interval=4", "--batch_size=4")
    rows_before = checkpoint.read_meta(tmp_path)["data"]["train"]["position"] * 4
    r = train(tmp_path, "--max_iters=5", "--eval_interval=5", "--init_from=resume", "--batch_size=8")
    assert "no longer bit-exact" in r.stdout and "global batch 4 -> 8 rows" in r.stdout
    meta = checkpoint.read_meta(tmp_path)
    assert meta["config"]["batch_size"] == 8 and meta["data"]["world_size"] == 1
    assert meta["data"]["train"]["position"] * 8 == rows_before + 8  # the same rows, then one batch of 8


# --- 4. bad input is one line ----------------------------------------------------------------------------

def test_a_ckpt_json_missing_a_key_is_one_line(tmp_path):
    train(tmp_path, "--max_iters=2", "--eval_interval=2")
    meta = json.loads((tmp_path / "ckpt.json").read_text())
    del meta["data"]
    (tmp_path / "ckpt.json").write_text(json.dumps(meta))
    r = run(train_cmd(tmp_path, "--max_iters=4", "--init_from=resume"))
    assert last_line(r) == f"error: corrupt checkpoint metadata {tmp_path / 'ckpt.json'}: no 'data' key"


@pytest.mark.parametrize("damage, message", [
    (lambda ids: ids.tobytes() + b"\0", "bytes, an odd number: not a file of uint16 token ids"),
    (lambda ids: np.append(ids, np.uint16(60000)).tobytes(), "holds token id 60000, beyond vocab_size=50304"),
])
def test_a_damaged_token_file_names_the_file(tmp_path, damage, message):
    data = DATA_ROOT / f"faulty_{os.getpid()}"
    data.mkdir()
    try:
        ids = np.fromfile(ROOT / "data/shakespeare/val.bin", dtype=np.uint16)[:5000]
        (data / "val.bin").write_bytes(ids.tobytes())
        (data / "train.bin").write_bytes(damage(ids))
        r = run(train_cmd(tmp_path, f"--dataset={data.name}", "--max_iters=2"))
        assert last_line(r).startswith(f"error: {data / 'train.bin'} ") and message in last_line(r)
    finally:
        for p in data.iterdir():
            p.unlink()
        data.rmdir()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path):
    r = run([sys.executable, "train.py", "configs/tiny.py", f"--out_dir={tmp_path}", "--device=cuda"])
    assert last_line(r).startswith("error: device=cuda but ")
    r = run([sys.executable, "sample.py", "x", "--device=cuda"])
    assert last_line(r).startswith("error: device=cuda but ")


@pytest.mark.parametrize("args, message", [
    (["--top_k=-1"], "--top_k must be >= 1 (or 0: all tokens); got -1"),
    (["--prompt", ""], "--prompt must not be empty (the default is a newline)"),
    (["--max_new_tokens=0"], "--max_new_tokens must be at least 1; got 0"),
    (["--temperature=-1"], "--temperature must be >= 0; got -1.0"),
])
def test_sample_py_checks_its_arguments(args, message):
    assert last_line(run([sys.executable, "sample.py", "out/none", "--device=cpu", *args])) == f"error: {message}"


@pytest.mark.parametrize("args, message", [
    (["--params=-5"], "error: --params must be at least 1, got '-5'"),
    (["configs/tiny.py", "--measure", "--steps=0"], "error: --steps must be at least 1, got '0'"),
    (["--n_layer=-2"], "error: config key 'n_layer' must be at least 1; got -2"),
])
def test_memory_command_checks_its_sizes(args, message):
    assert last_line(run([sys.executable, "-m", "nanoft", "memory", *args])) == message


# --- 5. a full disk --------------------------------------------------------------------------------------

def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
    return apply


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint_and_leaves_nothing_behind(tmp_path):
    train(tmp_path, "--max_iters=2", "--eval_interval=2")
    before, best_before = files(tmp_path), files(tmp_path / "best")
    r = run(train_cmd(tmp_path, "--max_iters=4", "--eval_interval=4", "--init_from=resume"),
            preexec_fn=_file_size_limit(1 << 20))  # metrics fit; a 20 MB checkpoint does not
    # the first write to fail is best/ when step 4 has a lower validation loss, else the latest checkpoint
    assert re.fullmatch(rf"error: could not write the step 4 checkpoint in {re.escape(str(tmp_path))}(/best)?: "
                        r".*File too large.*; the previous checkpoint is kept", last_line(r)), last_line(r)
    after = files(tmp_path)
    assert after.keys() == before.keys()  # no orphan tensor file, no .tmp
    written = ("metrics.jsonl", ".lock")  # appended to, and naming its holder
    assert {k: v for k, v in after.items() if k not in written} == {k: v for k, v in before.items() if k not in written}
    assert files(tmp_path / "best") == best_before
    assert checkpoint.load(tmp_path).step == 2 and checkpoint.load(tmp_path / "best").step == 2


# --- 6. distributed: a rank that never arrives ends the run --------------------------------------------

def test_a_missing_rank_times_out_after_dist_timeout(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, sys, time\n"
        "import torch.distributed as dist\n"
        "from nanoft.run import distributed\n"
        "from nanoft.config import Config\n"
        "d = distributed.setup('cpu', Config(dist_timeout=3))\n"
        "if d.rank == 1:\n"
        "    time.sleep(60)\n"  # hangs: never joins the collective
        "t = time.time()\n"
        "try:\n"
        "    dist.barrier()\n"
        "except Exception as e:\n"
        "    print(f'timed out after {time.time() - t:.0f} s', flush=True)\n"
        "    os._exit(3)\n")
    t = time.time()
    r = run([sys.executable, *torchrun(2), str(script)],
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "timed out after" in r.stdout, r.stderr[-2000:]
    assert time.time() - t < 50  # not the 60 s rank 1 sleeps, nor torch's 30-minute default


# --- 8. the best weights are kept beside the latest -------------------------------------------------------

def test_the_lowest_validation_loss_is_kept_in_best(tmp_path):
    train(tmp_path, "--max_iters=12", "--eval_interval=3", "--save_interval=12")
    val = {r["step"]: r["val_loss"] for r in strict_records(tmp_path) if "val_loss" in r}
    best_step = min(val, key=val.get)
    best = checkpoint.load(tmp_path / "best")
    assert best.step == best_step and best.extra["val_loss"] == val[best_step]
    assert checkpoint.best_val_loss(tmp_path) == val[best_step]
    for which in (["--best"], []):
        s = run([sys.executable, "sample.py", str(tmp_path), *which, "--max_new_tokens=5", "--device=cpu"])
        assert s.returncode == 0 and s.stdout.startswith("\n"), s.stderr[-2000:]
