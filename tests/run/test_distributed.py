"""torchrun as a user runs it: 2 CPU processes over gloo on loopback, against one process.

Two ranks of batch_size=4 see the rows one process of batch_size=8 sees (nanoft.data.tokens.Batches), so their
per-step losses must agree to floating-point tolerance (the reduction order differs, nothing else), for
DDP and for the sharded mode (FSDP2), and a checkpoint moves between 1 process, DDP and FSDP.
With dropout each rank draws its own masks, and a 2-rank run resumed on 2 ranks continues each rank's own.
The learning rate is constant (warmup 0, min_lr = lr) so that a run stopped at max_iters=3 and resumed
with max_iters=6 follows the same schedule as a straight run of 6 steps.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_ranks, torchrun

from nanoft.config import load_config
from nanoft.data.sft import collate
from nanoft.model.gpt import GPT
from nanoft.objectives.base import NextTokenLoss
from nanoft.run import checkpoint, distributed

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--eval_iters=2", "--eval_interval=3",
         "--save_interval=3", "--log_interval=1", "--warmup_iters=0", "--lr=3e-3", "--min_lr=3e-3", "--dropout=0.0",
         "--grad_accum=2", "--device=cpu"]  # grad_accum=2: DDP skips the all-reduce on the first micro-step
TOL = 1e-4  # float32 sums in another order: observed differences are ~1e-6 on losses of ~10


def env() -> dict:
    e = dict(os.environ, NANOFT_OFFLINE="1", OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        e["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's traffic on loopback
    return e


def train(out_dir, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    args = ["train.py", "configs/tiny.py", f"--out_dir={out_dir}", *SMALL, *extra]
    if nproc > 1:
        args = torchrun(nproc) + args
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
    for k, w in want.items():
        assert got[k].shape == w.shape, k
        assert (got[k] - w).abs().max().item() <= 1e-3 * scale, k


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


def test_fsdp_trains_with_paged_8bit_adamw_and_its_checkpoint_resumes_in_one_process(tmp_path):
    """train.py --fsdp=True with a memory-saving optimizer (each optimizer's sharded maths against one process,
    2 and 3 ranks: tests/optim/test_sharded_states.py): losses as one process's, and the plain checkpoint it writes,
    8-bit states gathered, continues in one process as the straight run does."""
    opt = ["--optimizer=paged_adamw8bit", "--min_8bit_size=1024", "--page_size=4096", "--dtype=float32"]
    train(tmp_path / "one", "--batch_size=8", "--max_iters=6", *opt)
    train(tmp_path / "fsdp", "--batch_size=4", "--max_iters=3", "--fsdp=True", *opt, nproc=2)
    one = metrics(tmp_path / "one")
    assert_same_losses(metrics(tmp_path / "fsdp"), one, [1, 2, 3])
    states = checkpoint.load(tmp_path / "fsdp").optim["state"].values()
    assert any("exp_avg_codes" in s for s in states) and any("exp_avg" in s for s in states)  # 8-bit and 32-bit
    got = resume_copy(tmp_path / "fsdp", tmp_path / "resumed", "--batch_size=8", *opt)
    assert_same_losses(got, one, [4, 5, 6])


# ---- dropout: each rank its own masks, each continued on resume ----

@pytest.fixture(scope="module")
def dropout_straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("dropout")
    train(out, "--batch_size=4", "--max_iters=6", "--dropout=0.2", nproc=2)
    return metrics(out)


@pytest.fixture(scope="module")
def dropout_stopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("dropout_stopped")
    train(out, "--batch_size=4", "--max_iters=3", "--dropout=0.2", nproc=2)
    return out


def test_ddp_with_dropout_resumes_each_ranks_own_rng(dropout_stopped, dropout_straight, tmp_path):
    rng = checkpoint.load(dropout_stopped).rng
    assert sorted(rng) == ["rank0.torch_cpu", "rank1.torch_cpu"]  # every rank's own, not rank 0's alone
    assert not torch.equal(rng["rank0.torch_cpu"], rng["rank1.torch_cpu"])
    got = resume_copy(dropout_stopped, tmp_path / "ddp", "--batch_size=4", "--dropout=0.2", nproc=2)
    for step in (4, 5, 6):  # the same arithmetic as the straight run, masks included: equal, not just close
        assert got[step]["loss"] == dropout_straight[step]["loss"], (step, got[step], dropout_straight[step])
    assert got[6]["val_loss"] == dropout_straight[6]["val_loss"]


def test_ddp_dropout_checkpoint_resumed_in_one_process_says_the_masks_differ(dropout_stopped, tmp_path):
    shutil.copytree(dropout_stopped, tmp_path / "one")
    r = train(tmp_path / "one", "--max_iters=4", "--init_from=resume", "--batch_size=8", "--dropout=0.2")
    lines = [line for line in r.stdout.splitlines() if line.startswith("resume: RNG states")]
    assert lines == [("resume: RNG states saved by 2 process(es), resumed by 1: rank 0 continues rank 0's; "
                      "dropout masks no longer match an uninterrupted run")]
    assert checkpoint.load(tmp_path / "one").rng.keys() == {"torch_cpu"}  # one process again: its own names


def _rank(rank: int, world: int) -> dict:
    """One of 2 gloo ranks: build a GPT as train.py does, shard it with a bf16 policy, reseed per rank,
    and report what this rank saw."""
    d = distributed.Dist(rank, rank, world, fsdp=True)
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.py", SMALL + ["--dropout=0.5"])
    model = GPT(cfg)
    init = model.blocks[0].mlp.fc_in.weight.sum().item()
    model = distributed.place(model, d, "cpu", torch.bfloat16)
    seen = []  # the dtype of a block's weight while the block runs (all-gathered) and of its shard
    model.blocks[0].mlp.register_forward_pre_hook(lambda m, _: seen.append(str(m.fc_in.weight.dtype)))
    distributed.seed_ranks(d, cfg.seed, "cpu", None)
    mask = (F.dropout(torch.ones(256), 0.5) != 0).tolist()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    model(x, x).backward()
    shard = model.blocks[0].mlp.fc_in.weight
    return {"init": init, "mask": mask, "in_forward": seen[0], "shard": str(shard.dtype), "grad": str(shard.grad.dtype)}


def test_ranks_share_initial_weights_but_not_dropout_masks_and_fsdp_gathers_bf16():
    r0, r1 = run_ranks(_rank, 2)
    assert r0["init"] == r1["init"]  # fully_shard does not broadcast: the weights must be built alike
    assert r0["mask"] != r1["mask"]  # seed + rank: each rank drops its own units
    for r in (r0, r1):  # gathered in bf16; the shards, their gradients (reduced in fp32) and Adam stay fp32
        assert (r["in_forward"], r["shard"], r["grad"]) == ("torch.bfloat16", "torch.float32", "torch.float32")


def sft_rows() -> list[tuple[list[int], int]]:
    """4 (ids, n_prompt) rows: rank 0's two have 2 and 3 response tokens, rank 1's two have 25 and 20."""
    g = torch.Generator().manual_seed(3)
    shapes = [(12, 10), (9, 6), (30, 5), (26, 6)]  # (length, n_prompt)
    return [(torch.randint(0, 50257, (n,), generator=g).tolist(), p) for n, p in shapes]


def sft_model() -> GPT:
    torch.manual_seed(0)
    return GPT(load_config("configs/tiny.py", SMALL))


def sft_step(model, rows, micro_batches: int, ddp=None) -> tuple[float, float]:
    """One SFT step's gradients, as train.py accumulates them: (the loss it logs, the plain mean of the means)."""
    batches = [collate(rows[i::micro_batches], block_size=32) for i in range(micro_batches)]
    objective = NextTokenLoss()
    objective.begin_step(batches)
    logged, means = 0.0, 0.0
    for i, batch in enumerate(batches):
        with distributed.sync_gradients(ddp or model, last_micro_step=i == micro_batches - 1):
            loss = objective(ddp or model, batch) / micro_batches
        loss.backward()
        logged += loss.item()
        with torch.no_grad():
            means += model(*batch).item() / micro_batches  # unweighted
    return logged, means


def _sft_rank(rank: int, world: int, micro_batches: int) -> dict:
    """One DDP rank's SFT step on its half of the rows: the loss it logs and the averaged gradients."""
    d = distributed.Dist(rank, rank, world)
    raw = sft_model()
    logged, means = sft_step(raw, sft_rows()[rank * 2:(rank + 1) * 2], micro_batches, distributed.wrap(raw, d, "cpu"))
    logged, means = (distributed.mean_across_ranks(torch.tensor(v), d).item() for v in (logged, means))
    return {"loss": logged, "mean_of_means": means, "grads": {n: p.grad for n, p in raw.named_parameters()}}


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_sft_ranks_and_micro_batches_with_unequal_response_tokens_train_like_one_batch(micro_batches):
    """2 ranks holding 5 and 45 response tokens (with 2 micro-batches: 2, 3, 25 and 20): the logged loss and the
    gradient are one process's token mean over all 50 tokens in one batch, not the mean of the ranks' (and
    micro-batches') means, which weights rank 0's 5 tokens 9 times more."""
    model = sft_model()
    one_batch = sft_step(model, sft_rows(), 1)[0]
    accumulated = sft_model()  # one process, 4 micro-batches of one row: 2, 3, 25 and 20 tokens
    assert sft_step(accumulated, sft_rows(), 4)[0] == pytest.approx(one_batch, rel=1e-5)
    ranks = run_ranks(_sft_rank, 2, micro_batches)
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for name, p in accumulated.named_parameters():
        assert (p.grad - model.get_parameter(name).grad).abs().max().item() <= 1e-5 * scale, name
    for r in ranks:
        assert r["loss"] == pytest.approx(one_batch, rel=1e-5)  # float32 sums in another order
        assert abs(r["mean_of_means"] - one_batch) > 100 * TOL  # what averaging the means would log
        # float32 sums in another order, measured against the largest gradient (as assert_near): ~5e-7 of it seen
        for name, p in model.named_parameters():
            assert (r["grads"][name] - p.grad).abs().max().item() <= 1e-5 * scale, name


def test_mixed_precision_policy_only_for_low_precision():
    assert distributed.mixed_precision(torch.float32) is None
    for dtype in (torch.bfloat16, torch.float16):
        policy = distributed.mixed_precision(dtype)
        assert (policy.param_dtype, policy.reduce_dtype) == (dtype, torch.float32)


def test_fsdp_trains_in_bf16_close_to_float32(one_process, tmp_path):
    train(tmp_path, "--batch_size=4", "--max_iters=3", "--fsdp=True", "--dtype=bfloat16", nproc=2)
    got = metrics(tmp_path)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "val_loss"):
            if key in one_process[step]:
                # observed ~3e-4 on losses of ~10.8: bf16 weights in the matmuls, fp32 everywhere else
                assert abs(got[step][key] - one_process[step][key]) < 0.01, (step, key, got[step], one_process[step])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    """kill -9 of torchrun itself: its two workers (a long run) must end too, not train on unwatched."""
    import signal
    import time

    args = [*torchrun(2), "train.py", "configs/tiny.py", f"--out_dir={tmp_path / 'run'}", *SMALL,
            "--max_iters=100000", "--eval_interval=100000", "--save_interval=100000", "--log_interval=1", "--compile=False"]
    launcher = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):  # both ranks train
            assert time.time() < deadline and launcher.poll() is None, "the run did not start"
            time.sleep(0.2)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                 text=True).stdout.split()]
        assert len(workers) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        alive = workers
        while alive and time.time() < deadline:
            time.sleep(0.2)
            alive = [p for p in workers if Path(f"/proc/{p}").exists() and
                     Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
        assert not alive, f"workers {alive} still run after their launcher was killed"
    finally:
        for p in subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split():
            os.kill(int(p), signal.SIGKILL)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stop_signal_under_torchrun_saves_the_same_step_on_every_rank(stop, tmp_path):
    """Ctrl-C in a terminal: SIGINT to torchrun and both FSDP workers (and torchrun passes it on); a scheduler's
    SIGTERM to torchrun alone, which passes it on. Each rank finishes its step, they agree on it, gather and save
    it, and exit: the checkpoint is the last step logged."""
    import signal
    import time

    args = [*torchrun(2), "train.py", "configs/tiny.py", f"--out_dir={tmp_path}", *SMALL,
            "--max_iters=100000", "--eval_interval=100000", "--save_interval=100000", "--log_interval=1",
            "--compile=False", "--fsdp=True", "--batch_size=4"]
    launcher = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    metrics_file = tmp_path / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 3):
            assert time.time() < deadline and launcher.poll() is None, "the run did not start"
            time.sleep(0.1)
        if stop == "ctrl-c":
            os.killpg(launcher.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        else:
            launcher.send_signal(signal.SIGTERM)  # what Slurm or Kubernetes does: the job's main process
        out = launcher.communicate(timeout=120)[0]
    finally:
        for p in subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split():
            os.kill(int(p), signal.SIGKILL)
    step = checkpoint.load(tmp_path).step
    assert f"interrupted: saving a checkpoint at step {step}" in out
    assert step >= 3 and max(metrics(tmp_path)) == step
