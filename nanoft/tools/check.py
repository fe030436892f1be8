"""Self-check of this machine's path through nanoft, in one command:

    python -m nanoft check                  # on a GPU: kernels, bandwidth, configs/100m.py x every optimizer, LoRA, QLoRA
    python -m nanoft check --steps=50       # longer training runs
    python -m nanoft check --skip-training  # kernels and bandwidth only (a minute)

1. kernels: every Triton kernel (NF4 quantize/dequantize with and without double quantization, 8-bit
   blockwise quantize/dequantize, the fused 8-bit AdamW update) on this device, against its plain-PyTorch
   reference on the CPU, bit for bit; with bitsandbytes when it is installed, against its quantizer too.
2. bandwidth: NF4 dequantize of a 4096 x 4096 bf16 weight in GB/s of bytes moved, beside a device-to-device
   copy measured in the same run (the achievable ceiling) and bitsandbytes' dequantize_4bit.
3. training: train.py itself, `--steps` steps of configs/100m.py (configs/tiny.py without a GPU) with each
   optimizer, then LoRA and QLoRA fine-tunes of the AdamW run's checkpoint: final loss (each optimizer's within
   a tolerance of AdamW's; QLoRA's of LoRA's), tokens/s and MFU (train.py's own figures, from its metrics.jsonl),
   and on CUDA the measured peak memory beside nanoft.tools.memory.command's estimate.
Prints a table per part and exits 1 on any mismatch. On a machine without CUDA the same checks run on the CPU
(Triton through its interpreter: slow, so the kernel shapes there are small).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from nanoft.config import load_config
from nanoft.kernels import dequantize_blockwise8, dequantize_nf4, dynamic_map, quantize_blockwise8, quantize_nf4
from nanoft.kernels.adamw8bit import adamw8bit_update_
from nanoft.optim import OPTIMIZERS
from nanoft.tools.memory.estimate import Run
from nanoft.tools.memory.peak import peak_bytes
from nanoft.tools.memory.shape import ModelShape

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if CUDA else "cpu"
# how far each fine-tune's final loss may be from its yardstick's (relative); each optimizer's distance from AdamW's
# is a fact of its table entry (nanoft.optim: loss_tolerance)
TRACKS = {"lora": ("lora", 0.0), "qlora": ("lora", 0.05)}
failures: list[str] = []


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, the sign of zero and NaN payloads included."""
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def row(cells, widths) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))


def check_kernels() -> None:
    shape = (1024, 1000) if CUDA else (64, 100)  # the interpreter runs a kernel as Python: small on a CPU
    gen = torch.Generator().manual_seed(0)
    print(f"\n1. kernels on {DEVICE} against the PyTorch reference on the CPU ({shape[0]} x {shape[1]}, odd tails)")
    widths = (34, 18, 10)
    print(row(("kernel", "variant", "result"), widths))
    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
        for double_quant in (False, True):
            ref = quantize_nf4(x, 64, double_quant, backend="torch")
            ours = quantize_nf4(x.to(DEVICE), 64, double_quant, backend="triton")
            fields = ("packed", "absmax", "offset", "nested_absmax") if double_quant else ("packed", "absmax")
            ok_q = all(same_bits(getattr(ref, f), getattr(ours, f)) for f in fields)
            ok_d = same_bits(dequantize_nf4(ref, backend="torch"), dequantize_nf4(ours, backend="triton"))
            dq = "dq" if double_quant else "no dq"
            results += [("nf4 quantize", f"{str(dtype)[6:]} {dq}", ok_q), ("nf4 dequantize", f"{str(dtype)[6:]} {dq}", ok_d)]
        for signed in (True, False):
            code = dynamic_map(signed)
            y = x.abs() if not signed else x
            q_ref, a_ref = quantize_blockwise8(y, code, 256, backend="torch")
            q, a = quantize_blockwise8(y.to(DEVICE), code.to(DEVICE), 256, backend="triton")
            ok = same_bits(q_ref, q) and same_bits(a_ref, a) and same_bits(
                dequantize_blockwise8(q_ref, a_ref, code, 256, dtype, backend="torch"),
                dequantize_blockwise8(q, a, code.to(DEVICE), 256, dtype, backend="triton"))
            results.append(("blockwise8 quantize + dequantize", f"{str(dtype)[6:]} {'signed' if signed else 'unsigned'}", ok))
    for dtype in (torch.float32, torch.bfloat16):
        n = shape[0] * shape[1] + 37
        p = torch.randn(n, generator=gen).to(dtype)
        blocks = -(-n // 256)
        ref = [p.clone(), torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks), torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks)]
        ours = [t.clone().to(DEVICE) for t in ref]
        for step in range(1, 4):
            g = (torch.randn(n, generator=gen) * 0.01).to(dtype)
            hp = dict(step=step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
            adamw8bit_update_(ref[0], g, *ref[1:], backend="torch", **hp)
            adamw8bit_update_(ours[0], g.to(DEVICE), *ours[1:], backend="triton", **hp)
        # states bit for bit; p to within torch's CPU sqrt, which is not correctly rounded (tests/optim/test_adamw8bit.py)
        ok = all(same_bits(a, b) for a, b in zip(ref[1:], ours[1:])) and torch.allclose(
            ours[0].cpu().float(), ref[0].float(), rtol=3e-7, atol=3e-8)
        results.append(("adamw8bit update (3 steps)", str(dtype)[6:], ok))
    results += _against_bitsandbytes(shape, gen)
    for name, variant, ok in results:
        print(row((name, variant, "ok" if ok else "MISMATCH"), widths))
        if not ok:
            failures.append(f"kernel {name} {variant}")


def _against_bitsandbytes(shape, gen) -> list:
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        print("(bitsandbytes not installed: its comparisons skipped)")
        return []
    x = torch.randn(shape, generator=gen).to(DEVICE, torch.bfloat16)
    out = []
    for double_quant in (False, True):
        # double quantization's offset is a float32 mean, whose rounding depends on the summation order: ours
        # takes the CPU's (as bitsandbytes' CPU path); bitsandbytes on CUDA takes CUDA's, so compare with its CPU path
        theirs = x.cpu() if double_quant else x
        packed, state = bnbF.quantize_4bit(theirs, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        ours = quantize_nf4(x, 64, double_quant, backend="auto")
        ok = same_bits(ours.packed, packed.view(-1)) and same_bits(ours.absmax, state.absmax)
        out.append(("nf4 quantize vs bitsandbytes", "dq" if double_quant else "no dq", ok))
    return out


def _time(fn, reps: int = 50) -> float:
    """Median seconds of fn(): on a GPU Triton's do_bench (CUDA events, L2 flushed between runs, as
    bench/bench_nf4.py times), on a CPU the wall clock."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_bandwidth() -> None:
    n = 4096
    w = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) * 0.02
    q = quantize_nf4(w, 64, True)
    moved = q.packed.numel() + q.absmax.numel() + n * n * 2  # codes and 8-bit absmax read, bf16 written
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
    copy_gbps = 2 * big.numel() / _time(lambda: big.clone()) / 1e9  # a copy reads and writes every byte
    print(f"\n2. NF4 dequantize, {n} x {n} bf16, double quant, on {DEVICE}: {moved / 1e6:.1f} MB moved per call")
    widths = (36, 12, 10, 14)
    print(row(("implementation", "time", "GB/s", "of copy"), widths))
    rows = [("device-to-device copy (ceiling)", 2 * big.numel() / copy_gbps / 1e9, copy_gbps)]
    t = _time(lambda: dequantize_nf4(q, torch.bfloat16))
    rows.append(("nanoft " + ("Triton" if CUDA else "PyTorch reference"), t, moved / t / 1e9))
    try:
        import bitsandbytes.functional as bnbF
        packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        tb = _time(lambda: bnbF.dequantize_4bit(packed, state))
        rows.append(("bitsandbytes dequantize_4bit", tb, moved / tb / 1e9))
    except ImportError:
        tb = None
    for name, secs, gbps in rows:
        print(row((name, f"{secs * 1e6:.1f} us", f"{gbps:.0f}", f"{100 * gbps / copy_gbps:.0f}%"), widths))
    if tb is not None:
        print(f"nanoft is {tb / t:.2f}x bitsandbytes' speed")


def _train(config: str, out_dir: Path, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), config, f"--out_dir={out_dir}", f"--max_iters={steps}",
           f"--warmup_iters={min(5, steps)}", f"--eval_interval={steps}", f"--save_interval={steps}",
           f"--log_interval={max(1, steps // 4)}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:120]}
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    later = records[1:] or records  # the first interval holds start-up (allocator, kernels' first compile)
    return {"loss": records[-1]["loss"], "tok_s": statistics.median(r["tokens_per_s"] for r in later),
            "mfu": statistics.median(r["mfu"] for r in later), "peak": records[-1].get("peak_gib")}


def check_training(steps: int) -> None:
    base_config = "configs/100m.py" if CUDA else "configs/tiny.py"
    print(f"\n3. train.py {base_config}, {steps} steps each, then LoRA and QLoRA on the AdamW run's checkpoint")
    widths = (16, 10, 10, 8, 11, 11, 8)
    print(row(("run", "loss", "tokens/s", "MFU", "peak GiB", "estimate", "result"), widths))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(opt, base_config, ["--optimizer=" + opt]) for opt in OPTIMIZERS]
        runs += [(mode, "configs/lora_100m.py" if CUDA else "configs/lora.py",
                  [f"--init_from={Path(tmp) / 'adamw'}", "--finetune=" + mode, "--optimizer=adamw"]) for mode in ("lora", "qlora")]
        for name, config, extra in runs:
            if not CUDA:
                extra = extra + ["--device=cpu"]
            res = results[name] = _train(config, Path(tmp) / name, steps, extra)
            cfg = load_config(str(ROOT / config), [a for a in extra if not a.startswith("--init_from")])
            estimate = peak_bytes(ModelShape.from_config(cfg), Run.from_config(cfg, CUDA))["total"] / 2**30
            if "error" in res:
                failures.append(f"{name}: {res['error']}")
                print(row((name, "-", "-", "-", "-", f"{estimate:.2f}", "FAILED: " + res["error"]), widths))
                continue
            yardstick, tol = TRACKS.get(name) or ("adamw", OPTIMIZERS[name].loss_tolerance)
            ref = results.get(yardstick, {}).get("loss")
            ok = torch.isfinite(torch.tensor(res["loss"])).item() and (
                ref is None or abs(res["loss"] - ref) <= tol * abs(ref) + 1e-6)
            if not ok:
                failures.append(f"{name}: loss {res['loss']:.4f} vs {yardstick} {ref}")
            peak = f"{res['peak']:.2f}" if res["peak"] is not None else "-"
            print(row((name, f"{res['loss']:.4f}", f"{res['tok_s']:,.0f}", f"{100 * res['mfu']:.1f}%", peak,
                       f"{estimate:.2f}", "ok" if ok else f"MISMATCH (vs {yardstick})"), widths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanoft check", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (at least 4)")
    parser.add_argument("--skip-training", action="store_true", help="kernels and bandwidth only")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error(f"--steps must be at least 4, got {args.steps}")
    name = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"nanoft self-check on {name}: torch {torch.__version__}")
    check_kernels()
    check_bandwidth()
    if not args.skip_training:
        check_training(args.steps)
    if failures:
        print(f"\nFAILED ({len(failures)}): " + "; ".join(failures))
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
