"""Model FLOPs per token (nanoft.run.flops), the number MFU divides by the device's peak."""
import dataclasses
import json

import torch

from nanoft.config import Config
from nanoft.model.gpt import GPT
from nanoft.peft.lora_model import apply_lora
from nanoft.run.flops import flops_per_token, peak_flops

CFG = Config(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=256, device="cpu")


def test_full_training_is_6n_plus_12ltc():
    """nanoGPT's estimate: 6 FLOPs per weight (forward, and the two halves of backward) plus attention's
    12 L T C; the tied head is counted once, the position embedding (a lookup) not at all."""
    model = GPT(CFG)
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    assert flops_per_token(model, 2, 32, 64) == 6 * n + 12 * 2 * 32 * 64


def test_lora_skips_the_frozen_weights_gradient_and_nf4_weights_count_in_full():
    """Frozen weights need no weight gradient: 4 FLOPs each instead of 6. An NF4 layer does the same maths
    as the float one it replaced, so QLoRA and LoRA have the same model FLOPs."""
    counts = {}
    for finetune in ("lora", "qlora"):
        cfg = dataclasses.replace(CFG, finetune=finetune)
        torch.manual_seed(0)
        model = apply_lora(GPT(cfg), cfg)
        counts[finetune] = flops_per_token(model, 2, 32, 64)
    torch.manual_seed(0)
    full = GPT(CFG)
    n = sum(p.numel() for p in full.parameters()) - full.wpe.weight.numel()
    adapters = 2 * 2 * (8 * 64 + 64 * 8)  # 2 layers x q, v x (A + B) at the default r=8
    assert counts["lora"] == 4 * (n + adapters) + 2 * adapters + 12 * 2 * 32 * 64
    assert counts["qlora"] == counts["lora"]


def test_cpu_peak_is_a_measured_matmul():
    peak, source = peak_flops("cpu", torch.float32)
    assert source == "measured matmul" and 1e8 < peak < 1e15
    assert peak_flops("cpu", torch.float32)[0] == peak  # measured once per process


def test_measuring_the_peak_leaves_the_global_rng_alone():
    """train.py measures the CPU's peak after restoring a checkpoint's RNG: drawing from it would change
    every dropout mask after a resume."""
    from nanoft.run import flops
    flops._measured.clear()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    peak_flops("cpu", torch.float32)
    assert torch.equal(torch.rand(3), expected)


def test_the_cpu_peak_is_measured_in_the_runs_dtype_once_each():
    """train.py's MFU divides by the peak of the dtype it computes in: a bf16 run by a bf16 matmul's."""
    from nanoft.run import flops
    flops._measured.clear()
    bf16, source = peak_flops("cpu", torch.bfloat16)
    assert source == "measured matmul" and 1e8 < bf16 < 1e15
    assert set(flops._measured) == {("cpu", torch.bfloat16)}
    assert peak_flops("cpu", torch.bfloat16)[0] == bf16


def test_the_cpu_peak_is_the_best_this_machine_has_shown(monkeypatch, tmp_path):
    """A matmul timed while other programs share the cores comes out slow; the peak (and so MFU) must not
    follow it: data/.cache/peak_flops.json keeps the best measurement for this CPU, dtype, threads and torch."""
    from nanoft.data import tokens
    from nanoft.run import flops
    monkeypatch.setattr(tokens, "DATA_ROOT", tmp_path)
    assert flops._best_ever("cpu", torch.float32, 2e11) == 2e11  # the first measurement is kept
    assert flops._best_ever("cpu", torch.float32, 1e11) == 2e11  # a slower one (a busy machine) does not replace it
    assert flops._best_ever("cpu", torch.bfloat16, 1e11) == 1e11  # each dtype its own
    assert flops._best_ever("cpu", torch.float32, 3e11) == 3e11  # a faster one does
    cached = json.loads((tmp_path / ".cache" / "peak_flops.json").read_text())
    assert sorted(cached.values()) == [1e11, 3e11] and all("threads" in key for key in cached)
    flops._measured.clear()
    assert peak_flops("cpu", torch.float32)[0] >= 3e11  # train.py's figure: at least the best ever shown
