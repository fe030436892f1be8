"""torchrun as a user runs it: 2 CPU processes over gloo on loopback, against one process.

Two ranks of batch_size=4 see the rows one process of batch_size=8 sees (nanoft.data.Batches), so their
per-step losses must agree to floating-point tolerance (the reduction order differs, nothing else), for
DDP and for the sharded mode (FSDP2), and a checkpoint moves between 1 process, DDP and FSDP.
The learning rate is constant (warmup 0, min_lr = lr) so that a run stopped at max_iters=3 and resumed
with max_iters=6 follows the same schedule as a straight run of 6 steps.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoft import checkpoint, distributed
from nanoft.config import load_config
from nanoft.model import GPT

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--eval_iters=2", "--eval_interval=3",
         "--save_interval=3", "--log_interval=1", "--warmup_iters=0", "--lr=3e-3", "--min_lr=3e-3", "--dropout=0.0",
         "--grad_accum=2", "--device=cpu"]  # grad_accum=2: DDP skips the all-reduce on the first micro-step
TOL = 1e-4  # float32 sums in another order: observed differences are ~1e-6 on losses of ~10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, NANOFT_OFFLINE="1", OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        e["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's traffic on loopback
    return e


def train(out_dir, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    args = ["train.py", "configs/tiny.py", f"--out_dir={out_dir}", *SMALL, *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def metrics(out_dir) -> dict[int, dict]:
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records}
    assert len(by_step) == len(records), "a step was logged twice: more than one rank writes metrics"
    return by_step


def assert_same_losses(got: dict, want: dict, steps) -> None:
    for step in steps:
        for key in ("loss", "val_loss"):
            if key in want[step]:
                assert abs(got[step][key] - want[step][key]) < TOL, (step, key, got[step][key], want[step][key])


def assert_near(got: dict, want: dict) -> None:
    """Equal up to rounding, measured against the largest value of all the tensors: Adam turns a 1e-7
    difference in a tiny gradient into a visible one in that element (and some gradients, such as the key
    biases', are rounding noise), but a misplaced or missing shard would be off by O(1)."""
    assert got.keys() == want.keys()
    scale = max(v.abs().max().item() for v in want.values())
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert (got[k] - want[k]).abs().max().item() <= 1e-3 * scale, k


def resume_copy(src, dst, *extra: str, nproc: int = 1) -> dict:
    shutil.copytree(src, dst)
    train(dst, "--max_iters=6", "--init_from=resume", *extra, nproc=nproc)
    return metrics(dst)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, global batch 8, 6 steps straight."""
    out = tmp_path_factory.mktemp("one")
    train(out, "--batch_size=8", "--max_iters=6")
    return metrics(out)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    r = train(out, "--batch_size=4", "--max_iters=3", nproc=2)
    assert r.stdout.count("sample:") == 1  # only rank 0 samples
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    r = train(out, "--batch_size=4", "--max_iters=3", "--fsdp=True", nproc=2)
    assert r.stdout.count("sample:") == 1
    return out


def test_ddp_per_step_losses_equal_one_process(ddp_run, one_process):
    got = metrics(ddp_run)
    assert sorted(got) == [1, 2, 3]
    assert_same_losses(got, one_process, [1, 2, 3])


def test_ddp_checkpoint_resumes_in_one_process_with_the_same_global_batch(ddp_run, one_process, tmp_path):
    got = resume_copy(ddp_run, tmp_path / "single", "--batch_size=8")  # 2 ranks x 4 rows = 1 process x 8
    assert_same_losses(got, one_process, [4, 5, 6])


def test_ddp_resumes_with_the_same_world_size(ddp_run, one_process, tmp_path):
    got = resume_copy(ddp_run, tmp_path / "ddp", "--batch_size=4", nproc=2)
    assert_same_losses(got, one_process, [4, 5, 6])


def test_fsdp_trains_like_one_process_and_saves_a_plain_checkpoint(fsdp_run, ddp_run, one_process):
    got = metrics(fsdp_run)
    assert sorted(got) == [1, 2, 3]
    assert_same_losses(got, one_process, [1, 2, 3])
    # the gathered checkpoint is what DDP (a full model per rank) saved at the same step
    sharded, full = checkpoint.load(fsdp_run), checkpoint.load(ddp_run)
    assert sharded.step == full.step == 3
    assert_near(sharded.model, full.model)
    assert sharded.optim["param_groups"] == full.optim["param_groups"]
    for slot in ("exp_avg", "exp_avg_sq", "step"):  # torch.optim.AdamW's state, per parameter id
        assert_near({i: s[slot] for i, s in sharded.optim["state"].items()},
                    {i: s[slot] for i, s in full.optim["state"].items()})
    # ...and one process loads it into a plain GPT
    cfg = load_config("configs/tiny.py", SMALL)
    model = GPT(cfg)
    checkpoint.load_weights(model, sharded.model, str(fsdp_run))
    aliases = [json.loads((out / "ckpt.json").read_text())["aliases"] for out in (fsdp_run, ddp_run)]
    assert aliases[0] == aliases[1] == {"lm_head.weight": "wte.weight"}  # the tied head is stored once


def test_fsdp_checkpoint_resumes_in_one_process(fsdp_run, one_process, tmp_path):
    got = resume_copy(fsdp_run, tmp_path / "single", "--batch_size=8")
    assert_same_losses(got, one_process, [4, 5, 6])


def test_fsdp_resumes_sharded_with_the_same_world_size(fsdp_run, one_process, tmp_path):
    # each rank cuts its shard of the full optimizer state out of the checkpoint
    got = resume_copy(fsdp_run, tmp_path / "fsdp", "--batch_size=4", "--fsdp=True", nproc=2)
    assert_same_losses(got, one_process, [4, 5, 6])


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw", "paged_adamw8bit", "adafactor"])
def test_fsdp_refuses_optimizers_that_need_whole_tensors(optimizer):
    cfg = load_config("configs/tiny.py", ["--fsdp=True", f"--optimizer={optimizer}"])
    with pytest.raises(ValueError, match=f"fsdp=True supports optimizer=adamw, not {optimizer}"):
        distributed.check_fsdp(cfg)


def test_fsdp_refusal_is_one_line_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "configs/tiny.py", f"--out_dir={tmp_path}", "--fsdp=True",
                        "--optimizer=adafactor"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: fsdp=True supports optimizer=adamw, not adafactor")
    assert not (tmp_path / "metrics.jsonl").exists()
