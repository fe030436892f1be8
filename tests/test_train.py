"""train.py as a user runs it, in subprocesses: learning, bit-exact resume after kill -9, atomic
checkpoints under kill -9 at random instants, Ctrl-C, sampling, wandb offline logging.

Uses the prepared Shakespeare set (the README's test command prepares it first) and a model small
enough that a step takes a few milliseconds.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoft.run import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
         "--warmup_iters=2", "--lr=3e-3", "--device=cpu"]


def train_cmd(out_dir, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "configs/tiny.py", f"--out_dir={out_dir}", *SMALL, *extra]


def run_train(out_dir, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run(train_cmd(out_dir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def losses_by_step(out_dir) -> dict[int, float]:
    """The last logged loss of each step (a killed run may have logged a step twice)."""
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def test_training_lowers_the_loss_and_samples(tmp_path):
    r = run_train(tmp_path, "--max_iters=40", "--log_interval=1", "--eval_interval=20", "--save_interval=20")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in records)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] - 0.5
    assert "sample:" in r.stdout
    assert checkpoint.load(tmp_path).step == 40
    s = subprocess.run([sys.executable, "sample.py", str(tmp_path), "--prompt", "ROMEO:", "--max_new_tokens=20",
                        "--seed=1"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    s2 = subprocess.run([sys.executable, "sample.py", str(tmp_path), "--prompt", "ROMEO:", "--max_new_tokens=20",
                         "--seed=1"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert s.stdout.startswith("ROMEO:") and len(s.stdout) > len("ROMEO:\n") and s.stdout == s2.stdout


def test_resume_after_kill_9_reproduces_every_loss_bit_for_bit(tmp_path):
    # dropout and gradient accumulation on: the RNG state and data position must both be restored
    # 60 steps: the killer acts at the first checkpoint (step 10) even if it is not scheduled for 50 steps' time
    args = ["--max_iters=60", "--log_interval=1", "--eval_interval=10", "--save_interval=10", "--dropout=0.1", "--grad_accum=2"]
    run_train(tmp_path / "straight", *args)
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(out, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not checkpoint.exists(out) and time.time() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait()
    interrupted_at = checkpoint.load(out).step
    assert 10 <= interrupted_at < 60
    run_train(out, *args, "--init_from=resume")
    assert losses_by_step(out) == losses_by_step(tmp_path / "straight")  # exact float equality


def test_kill_9_at_random_instants_always_leaves_a_loadable_checkpoint(tmp_path):
    rng = random.Random(0)
    # long by max_iters, so compile "auto" would compile: it is killed long before, so no compiling
    args = ["--max_iters=100000", "--log_interval=50", "--eval_interval=100000", "--save_interval=1", "--compile=False"]
    last_step = 0
    for _ in range(6):
        extra = ["--init_from=resume"] if checkpoint.exists(tmp_path) else []
        proc = subprocess.Popen(train_cmd(tmp_path, *args, *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while committed_step(tmp_path) <= last_step and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere in a step or in the middle of a save
        finally:
            proc.send_signal(signal.SIGKILL)  # also when the test fails: never leave a trainer running
            proc.wait()
        step = checkpoint.load(tmp_path).step  # raises if the kill left a torn checkpoint
        assert step > last_step
        last_step = step
        assert len(list(tmp_path.glob("ckpt-*.safetensors"))) <= 2  # at most the committed one and a newer orphan


def committed_step(out_dir) -> int:
    """The step ckpt.json records, read without the tensors (the trainer is still writing)."""
    try:
        return json.loads((Path(out_dir) / "ckpt.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stop_signal_saves_the_step_and_exits_and_the_resume_is_bit_exact(signum, code, name, tmp_path):
    """Ctrl-C, or the SIGTERM with which Slurm, Kubernetes, docker stop and preemptible machines end a job."""
    # a constant learning rate (so that a run of max_iters=100000 and one of a few steps share every step's lr),
    # dropout and gradient accumulation: the resume below checks the RNG state and data position too
    same = ["--log_interval=1", "--eval_interval=100000", "--save_interval=100000", "--compile=False",
            "--warmup_iters=0", "--min_lr=3e-3", "--dropout=0.1", "--grad_accum=2"]
    args = ["--max_iters=100000", *same]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # SIGABRT then prints every thread's stack (see below)
    # started as a shell starts a background job (`python train.py ... &`): SIGINT inherited as ignored
    proc = subprocess.Popen(train_cmd(tmp_path, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509 (one thread)
    metrics = tmp_path / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while (not metrics.exists() or len(metrics.read_text().splitlines()) < 5) and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signum)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # hung: show where, so that the cause can be found
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"train.py did not exit within 60 s of {name}; where it was:\n{err[-4000:]}")
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]  # as a process ended by that signal reports it: 128 + its number
    assert f"{name}: stopping at the end of this step" in err and "interrupted: saving a checkpoint" in out
    step = checkpoint.load(tmp_path).step
    assert step >= 5 and max(losses_by_step(tmp_path)) == step  # the step it finished, logged, then saved
    if signum != signal.SIGINT:
        return  # the save and resume are Ctrl-C's, checked below
    # the checkpoint is the state after exactly that many steps: resumed, every loss equals a straight run's
    run_train(tmp_path, *same, f"--max_iters={step + 3}", "--init_from=resume")
    run_train(tmp_path / "straight", *same, f"--max_iters={step + 3}")
    assert losses_by_step(tmp_path) == losses_by_step(tmp_path / "straight")  # exact float equality


def test_resume_with_another_model_shape_is_a_clear_error(tmp_path):
    run_train(tmp_path, "--max_iters=2", "--eval_interval=2")
    r = subprocess.run(train_cmd(tmp_path, "--max_iters=4", "--n_layer=3", "--init_from=resume"), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: checkpoint {tmp_path} has n_layer=2 but the config has n_layer=3"
    r = subprocess.run(train_cmd(tmp_path / "nothing", "--init_from=resume"), cwd=ROOT, capture_output=True, text=True)
    assert "error: no checkpoint in" in r.stderr


def test_missing_dataset_is_a_clear_error(tmp_path):
    r = subprocess.run(train_cmd(tmp_path, "--dataset=no_such_set"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no_such_set" in r.stderr.strip().splitlines()[-1]


def test_wandb_offline_logs_loss_lr_tokens_and_val_loss(tmp_path):
    from wandb.proto import wandb_internal_pb2

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    r = subprocess.run(train_cmd(tmp_path / "run", "--max_iters=6", "--log_interval=2", "--eval_interval=6", "--wandb_log=True"),
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = []
    for payload in read_leveldb_log(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    logged = {h["_step"]: h for h in history}
    expected = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(logged) == sorted(expected) == [2, 4, 6]
    for step, rec in expected.items():
        assert logged[step]["loss"] == rec["loss"] and logged[step]["lr"] == rec["lr"]
        assert logged[step]["tokens_per_s"] == rec["tokens_per_s"]
    assert logged[6]["val_loss"] == expected[6]["val_loss"]


def read_leveldb_log(data: bytes):
    """Records of wandb's LevelDB-style log: a 7-byte file header, then 32 KiB blocks of chunks, each
    chunk a 7-byte header (crc32: 4, length: 2, type: 1; FULL=1 FIRST=2 MIDDLE=3 LAST=4) + payload."""
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left_in_block = block - (pos % block)
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload


def test_a_run_shorter_than_its_warmup_runs_and_says_so(tmp_path):
    r = run_train(tmp_path, "--max_iters=3", "--warmup_iters=30", "--log_interval=1", "--eval_interval=3")
    assert ("note: the run ends inside its warmup (max_iters=3 < warmup_iters=30): the learning rate rises to "
            "2.90e-04, not to its peak lr=3.00e-03") in r.stdout  # 3e-3 * 3 / 31 at step 2: nanoGPT's warmup
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == sorted(lrs) and max(lrs) == pytest.approx(3e-3 * 3 / 31)
    r = subprocess.run(train_cmd(tmp_path / "bad", "--warmup_iters=-1"), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "config key 'warmup_iters' must be at least 0; got -1" in r.stderr  # nonsense stays


def test_a_run_sized_for_a_gpu_says_so_on_a_cpu_then_how_long_it_takes_here(tmp_path):
    # a tiny model over a billion steps: its model maths are a GPU's hours at this CPU's best matmul speed
    cmd = train_cmd(tmp_path, "--max_iters=1000000000", "--warmup_iters=0", "--eval_interval=1000000000",
                    "--save_interval=1000000000", "--log_interval=1", "--compile=False")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 120
        while not any(line.startswith("measured:") for line in lines) and time.time() < deadline:
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    note = next(line for line in lines if line.startswith("note:"))
    assert "configs/tiny.py is sized for a GPU: on this CPU it takes at least" in note
    assert "configs/tiny.py trains in minutes here" in note
    measured = next(line for line in lines if line.startswith("measured:"))
    assert " s a step on this CPU, so the remaining 999,999,997 steps take about " in measured
    quick = run_train(tmp_path / "quick", "--max_iters=3", "--eval_interval=3")  # minutes, not hours: no note
    assert "sized for a GPU" not in quick.stdout


def test_an_fp16_run_resumes_bit_for_bit_with_its_loss_scale(tmp_path):
    """fp16 autocast (what "auto" picks on a T4 or V100; it runs on a CPU too) with its GradScaler: the loss scale
    and its growth count travel in the checkpoint, so a resumed run equals a straight one. Every optimizer's own
    state goes through the same save and load in tests/optim/test_optimizer_state_resume.py."""
    extra = ["--dtype=float16"]
    # a constant learning rate, so that a run of 3 steps and one of 6 share every step's lr
    same = ["--n_layer=1", "--log_interval=1", "--eval_interval=100", "--compile=False", "--warmup_iters=0",
            "--min_lr=3e-3", *extra]
    run_train(tmp_path / "straight", *same, "--max_iters=6")
    run_train(tmp_path / "split", *same, "--max_iters=3")
    run_train(tmp_path / "split", *same, "--max_iters=6", "--init_from=resume")
    assert losses_by_step(tmp_path / "split") == losses_by_step(tmp_path / "straight")  # exact float equality
    straight, split = (checkpoint.load(tmp_path / name) for name in ("straight", "split"))
    assert split.extra["scaler"] == straight.extra["scaler"]  # without it the resumed count restarts at 0
    assert straight.extra["scaler"]["_growth_tracker"] == 6 and straight.extra["scaler"]["scale"] == 65536.0


def test_the_gradient_norm_is_logged_before_clipping_and_clipping_acts_only_above_it(tmp_path):
    def run(name: str, clip: float) -> list[dict]:
        run_train(tmp_path / name, "--n_layer=1", "--max_iters=4", "--log_interval=1", "--eval_interval=100",
                  "--compile=False", f"--grad_clip={clip}")
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    unclipped = run("off", 0)  # grad_clip=0 disables clipping
    norms = [r["grad_norm"] for r in unclipped]
    assert all(n > 0 for n in norms)
    above = run("above", 1e9)  # a bound above every norm: clipping changes nothing, bit for bit
    assert [(r["loss"], r["grad_norm"]) for r in above] == [(r["loss"], r["grad_norm"]) for r in unclipped]
    clipped = run("clipped", norms[0] / 10)  # a tenth of the first step's norm: every step is clipped
    assert clipped[0]["grad_norm"] == norms[0]  # the same first gradient, logged before clipping
    assert clipped[-1]["loss"] != unclipped[-1]["loss"]  # and the clipped steps took another path


def test_a_compiled_run_saves_and_resumes_bit_for_bit(tmp_path):
    """torch.compile, which "auto" turns on for configs/tiny.py on a CPU (the default path), through a save and
    a resume: the resumed run compiles the same graph again and continues with the same bits."""
    same = ["--n_layer=1", "--log_interval=1", "--eval_interval=100", "--compile=True", "--warmup_iters=0",
            "--min_lr=3e-3"]  # a constant lr: a run of 2 steps and one of 4 share every step's lr
    run_train(tmp_path / "straight", *same, "--max_iters=4")
    run_train(tmp_path / "split", *same, "--max_iters=2")
    run_train(tmp_path / "split", *same, "--max_iters=4", "--init_from=resume")
    assert losses_by_step(tmp_path / "split") == losses_by_step(tmp_path / "straight")  # exact float equality
