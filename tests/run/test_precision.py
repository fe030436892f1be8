"""The "auto" rules of nanoft/run/precision.py: bf16 on CPUs with bf16 instructions, float32 elsewhere; compile only
for runs long enough to repay it; explicit settings always win."""
import dataclasses

import pytest
import torch

from nanoft.config import Config, load_config
from nanoft.model.gpt import GPT
from nanoft.objectives import METHODS
from nanoft.run.precision import COMPILE_MIN_RUN_FLOPS, cpu_has_native_bf16, frozen_dtype, pick_compile, pick_dtype

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "Features\t: fp asimd dotprod\n"


@pytest.mark.parametrize("cpuinfo, native", [(ZEN4, True), (SAPPHIRE_RAPIDS, True), (SKYLAKE, False),
                                             (GRAVITON3, True), (GRAVITON2, False), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is (native and torch.backends.mkldnn.is_available())


def test_auto_dtype_on_this_cpu_follows_its_flags_and_explicit_names_win():
    assert pick_dtype("auto", "cpu", n_embd=128) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert pick_dtype("auto", "cpu", n_embd=32) == torch.float32  # too thin for bf16 to pay (measured 0.62x)
    assert pick_dtype("auto", "mps") == torch.float32
    for name in ("float32", "bfloat16", "float16"):
        assert pick_dtype(name, "cpu") == getattr(torch, name)


def test_a_frozen_lora_base_stays_float32_on_a_cpu_unless_named():
    assert frozen_dtype("auto", "cpu") == torch.float32
    assert frozen_dtype("bfloat16", "cpu") == torch.bfloat16
    assert frozen_dtype("auto", "mps") == pick_dtype("auto", "mps")


def test_compile_auto_only_for_runs_whose_maths_repay_it():
    cfg = load_config("configs/tiny.py", ["--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4"])
    model = GPT(cfg)
    short = dataclasses.replace(cfg, max_iters=40)  # what the train.py tests run: ~0.05 TFLOP
    long = dataclasses.replace(cfg, max_iters=int(2 * COMPILE_MIN_RUN_FLOPS / 1.26e9))  # 1.26 GFLOP per step
    measured = METHODS["none"].compile_measured(long)
    assert not pick_compile(short, model, "cpu", measured)
    assert pick_compile(long, model, "cpu", measured)
    assert not pick_compile(long, model, "cuda", measured)  # not measured on GPUs: "auto" leaves it off there
    lora = dataclasses.replace(long, finetune="lora")
    assert not pick_compile(lora, model, "cpu", METHODS["lora"].compile_measured(lora))  # nor for LoRA's graph
    for forced in (True, False):
        assert pick_compile(dataclasses.replace(short, compile=forced), model, "cpu", measured) is forced
        assert pick_compile(dataclasses.replace(long, compile=forced), model, "cuda", measured) is forced


def test_compile_setting_is_checked():
    assert Config().compile == "auto"
    for bad in ("fast", 1):
        with pytest.raises(ValueError, match="compile"):
            Config(compile=bad)
