"""The memory estimator against the 16 bytes/parameter rule, the real model, and measurements of real training steps."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoft.config import Config, ConfigError
from nanoft.model.gpt import GPT
from nanoft.tools.memory.command import (
    MeasureError,
    build,
    cpu_peak_bytes,
    exact_bytes,
    main,
    saved_activation_bytes,
    train_step,
)
from nanoft.tools.memory.estimate import Run, activation_bytes, nf4_bytes, static_bytes, trainable_and_frozen
from nanoft.tools.memory.peak import peak_bytes, rule_16_bytes
from nanoft.tools.memory.shape import GB, PRESETS, ModelShape
from nanoft.tools.memory.sharded import per_rank

ROOT = Path(__file__).resolve().parents[2]
# small, but with tensors on both sides of min_8bit_size (4096) and blocks that do not divide evenly
SMALL = Config(n_layer=2, n_head=4, n_embd=64, vocab_size=500, block_size=32, batch_size=3, grad_accum=2,
               device="cpu", dtype="float32", lora_r=4)


def _static_rows(est: dict) -> dict:
    return {k: est[k] for k in ("params", "grads", "states", "states_host")}


def test_seed_figures_exact():
    """The 16 bytes/parameter rule: fp32 AdamW full fine-tune, params + grads + states (activations excluded) = 16 B/param."""
    run = Run(Config(optimizer="adamw", finetune="full"), "cpu", 4)
    for name, want in (("7b", 112 * GB), ("70b", 1120 * GB)):
        est = static_bytes(PRESETS[name], run)
        assert est["params"] + est["grads"] + est["states"] == want
        assert rule_16_bytes(est["n_params"]) == want
    # the real LLaMA-2 shapes are a little smaller than the round names
    assert PRESETS["llama-7b"].num_params() == 6_738_415_616
    assert PRESETS["llama-70b"].num_params() == 68_976_648_192


@pytest.mark.parametrize("overrides", [{}, dict(bias=False), dict(n_layer=3, n_embd=96, n_head=3, block_size=17,
                                                                     vocab_size=1001)])
def test_param_formula_equals_model(overrides):
    cfg = dataclasses.replace(SMALL, **overrides)
    assert ModelShape.from_config(cfg).num_params() == GPT(cfg).num_params()


def _measured(cfg: Config) -> tuple[dict, dict]:
    """(exact bytes after one real step, the estimate)"""
    run = Run.from_config(cfg)
    model, opt = build(cfg, "cpu")
    grads = train_step(model, opt, run, torch.Generator().manual_seed(0), {})
    got = exact_bytes(model, opt)
    got["grads"] = grads  # as they were after the last backward, before zero_grad freed them
    return got, peak_bytes(ModelShape.from_config(cfg), run)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "adafactor"])
@pytest.mark.parametrize("finetune", ["full", "lora", "qlora"])
def test_parameter_gradient_state_bytes_exact(optimizer, finetune):
    cfg = dataclasses.replace(SMALL, optimizer=optimizer, finetune=finetune)
    got, est = _measured(cfg)
    assert _static_rows(est) == _static_rows(got)
    if optimizer.startswith("paged"):
        assert est["states"] == 0 and est["states_host"] > 0  # all of it in host memory


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_trainable_norms_are_counted_exactly(finetune):
    cfg = dataclasses.replace(SMALL, finetune=finetune, lora_train_norms=True)
    got, est = _measured(cfg)
    assert _static_rows(est) == _static_rows(got)
    without = _measured(dataclasses.replace(cfg, lora_train_norms=False))[0]
    norms = (2 * SMALL.n_layer + 1) * 2 * SMALL.n_embd  # ln_1, ln_2 per block and ln_f; gain and bias each
    assert got["grads"] - without["grads"] == 4 * norms


@pytest.mark.parametrize("overrides", [
    dict(), dict(gradient_checkpointing=True), dict(finetune="lora"), dict(finetune="lora", gradient_checkpointing=True),
    dict(finetune="qlora", lora_targets=("q_proj", "fc_out"), lora_dropout=0.0), dict(dtype="bfloat16"),
    dict(dropout=0.1), dict(finetune="lora", lora_train_norms=True)])
def test_activation_estimate_matches_saved_tensors(overrides):
    cfg = dataclasses.replace(SMALL, **overrides)
    run = Run.from_config(cfg)
    model, _ = build(cfg, "cpu")
    got = saved_activation_bytes(model, run, torch.Generator().manual_seed(0))
    est = activation_bytes(ModelShape.from_config(cfg), run)
    assert abs(est["peak"] - got["peak"]) <= 0.05 * got["peak"], (est, got)
    if cfg.gradient_checkpointing:
        assert got["recompute"] > 0  # one block comes back at a time


@pytest.mark.parametrize("overrides", [dict(), dict(finetune="lora", gradient_checkpointing=True)])
def test_total_within_ten_percent_of_cpu_peak(overrides):
    cfg = dataclasses.replace(SMALL, **overrides)
    run = Run.from_config(cfg)
    model, optimizer = build(cfg, "cpu")
    gen = torch.Generator().manual_seed(1)
    train_step(model, optimizer, run, gen, {})  # the optimizer states exist from here on
    alive = exact_bytes(model, optimizer)
    peak = cpu_peak_bytes(lambda: train_step(model, optimizer, run, gen, {}),
                          alive["params"] + alive["states"] + alive["states_host"])
    est = peak_bytes(ModelShape.from_config(cfg), run)
    assert abs(est["total"] - peak) <= 0.10 * peak, (est["total"], peak)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("finetune", ["none", "qlora"])
def test_total_within_two_percent_at_gpt2_vocabulary(dtype, finetune):
    """At GPT-2's 50,304-token vocabulary the chunked loss's moment is the peak: one chunk's float32 logits
    (2 chunks of 512 rows here), the casts autocast adds, the head's gradient and its per-chunk share."""
    cfg = Config(n_layer=1, n_head=2, n_embd=64, vocab_size=50304, block_size=256, batch_size=4, device="cpu",
                 dtype=dtype, finetune=finetune, optimizer="adamw", lora_r=4)
    run = Run.from_config(cfg)
    model, optimizer = build(cfg, "cpu")
    gen = torch.Generator().manual_seed(1)
    train_step(model, optimizer, run, gen, {})
    alive = exact_bytes(model, optimizer)
    peak = cpu_peak_bytes(lambda: train_step(model, optimizer, run, gen, {}),
                          alive["params"] + alive["states"] + alive["states_host"])
    est = peak_bytes(ModelShape.from_config(cfg), run)
    assert est["peak_moment"].startswith("loss forward")
    assert abs(est["total"] - peak) <= 0.02 * peak, (est["total"], peak)

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoft", "memory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_estimates_100m_without_allocating_it(tmp_path):
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "nanoft", "memory", "configs/100m.py"], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak (RUSAGE_CHILDREN: any child's so far)
        proc.returncode = os.waitstatus_to_exitcode(status)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert "total (peak)" in out and "102.82M parameters" in out
    for name in ("adamw8bit", "paged_adamw", "adafactor", "qlora peak"):
        assert name in out
    # the estimate alone stays far below the run it describes (~6 GiB): nothing of the model was allocated
    assert usage.ru_maxrss * 1024 < 2 * 2**30


def test_cli_llama_70b():
    r = _cli("--shape=llama-70b", "--block_size=4096", "--batch_size=1", "--device=cuda")
    assert r.returncode == 0, r.stderr
    assert "llama 80 layers x 8192 wide, 68,976.65M parameters" in r.stdout


def test_seed_presets_printed(capsys):
    main(["--shape=70b"])
    assert "= 1,120.00 GB (decimal)" in capsys.readouterr().out
    main(["--params=7e9"])
    assert "= 112.00 GB (decimal)" in capsys.readouterr().out


def test_cli_unknown_flag_is_one_clear_line():
    r = _cli("configs/100m.py", "--bogus=1")
    assert r.returncode != 0
    assert "unknown config key 'bogus'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["configs/100m.py", "--optimiser=adamw"], "did you mean optimizer"),
    (["--shape=llama-9b"], "unknown --shape 'llama-9b'"),
    (["--shape=llama-70b", "--measure"], "--measure builds nanoft's GPT"),
    (["configs/100m.py", "--steps=x"], "--steps expects int"),
    (["--params=7e9", "--optimizer=adafactor"], "Adafactor's states need the matrix shapes"),
])
def test_bad_arguments_raise_clear_errors(args, message):
    with pytest.raises((ConfigError, MeasureError, ValueError), match=re.escape(message)):
        main(args)


def test_main_measure_prints_both_columns(capsys):
    main(["configs/tiny.py", "--measure", "--batch_size=1", "--block_size=16", "--n_layer=1", "--vocab_size=256"])
    out = capsys.readouterr().out
    assert "measured" in out and "torch.profiler CPU allocator events" in out


def test_per_rank_under_fsdp_shards_the_frozen_base_and_keeps_adapters_whole(capsys):
    """QLoRA across 8 ranks (nanoft.tools.memory.sharded): each rank holds 1/8 of the NF4 base, all of the adapters,
    their gradients and states, and the gathered groups on top; activations are the rank's own batch's."""
    cfg = Config(finetune="qlora", optimizer="paged_adamw8bit", device="cuda", batch_size=1, block_size=2048,
                 gradient_checkpointing=True, fsdp=True)
    shape, run = PRESETS["llama-7b"], Run.from_config(cfg)
    one = peak_bytes(shape, run)
    rank = per_rank(one, shape, run, 8)
    _, frozen = trainable_and_frozen(shape, run)
    adapters = one["params"] - frozen
    assert rank["params"] == -(-frozen // 8) + adapters
    assert (rank["grads"], rank["states_host"], rank["activations"]) == (one["grads"], one["states_host"], one["activations"])
    # whole at once: the root group (embeddings, untied head, final norm; bf16) and two blocks (NF4 + two norms)
    C, F = 4096, 11008
    block = sum(nf4_bytes(n, cfg.nf4_blocksize, cfg.double_quant, False) for n in [C * C] * 4 + [C * F] * 3) + 2 * C * 2
    assert rank["gathered"] == (2 * 32000 * C + C) * 2 + 2 * block
    assert rank["total"] == one["total"] - (one["params"] - rank["params"]) + rank["gathered"]
    main(["--shape=llama-7b", "--finetune=qlora", "--fsdp=True", "--nproc=8", "--device=cuda"])
    assert "per rank of 8: FSDP2 shards" in capsys.readouterr().out
    with pytest.raises(MeasureError, match="one process"):
        main(["configs/tiny.py", "--fsdp=True", "--nproc=2", "--measure"])
