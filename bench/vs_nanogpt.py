"""Training speed on this CPU against karpathy/nanoGPT, side by side: the same shape, batch and data.

    python bench/vs_nanogpt.py --nanogpt ~/src/nanoGPT                 # each with its defaults for a CPU
    python bench/vs_nanogpt.py --nanogpt ~/src/nanoGPT --compile=True  # both compiled
    python bench/vs_nanogpt.py --nanogpt ~/src/nanoGPT --rounds 3 --iters 30

`--nanogpt` is a checkout of github.com/karpathy/nanoGPT (its train.py, model.py and configurator.py; nothing
of it is imported here). Both train a GPT of 4 layers x 256 wide (4 heads) on nanoft's prepared Shakespeare
token files (python data/prepare.py shakespeare; the same uint16 format nanoGPT reads), batch 16 x 128 tokens,
one micro-batch a step, for `--iters` iterations:

    nanoGPT: its train.py with --device=cpu --dtype=float32 --compile=False (its CPU path runs float32 whatever
             dtype says: its autocast is CUDA-only), eval_iters=1, log_interval=1: it prints each iteration's time
    nanoft:  train.py configs/tiny.py --n_embd=256 with every other key as configs/tiny.py and its defaults
             ("auto" dtype and compile), log_interval=1: out_dir/metrics.jsonl holds each step's tokens/s

Timing: the per-iteration wall time of each, median over the iterations after the 10th (the first ones hold
the compile, warm-up and nanoGPT's first evaluation); the runs alternate (nanoGPT, nanoft, nanoGPT, ...) for
`--rounds` rounds, so a busy machine's drift falls on both, and the ratio is nanoGPT's median / nanoft's
(above 1: nanoft is faster). Each run starts from an empty out_dir: nothing is resumed.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128, "batch_size": 16}
ITER_LINE = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.MULTILINE)


def nanogpt_ms(checkout: Path, work: Path, iters: int, compile_: bool) -> list[float]:
    """nanoGPT's per-iteration times, ms (its configurator.py reads from the working directory)."""
    shutil.copy(checkout / "configurator.py", work / "configurator.py")
    out = work / "out-nanogpt"
    shutil.rmtree(out, ignore_errors=True)
    args = [f"--{k}={v}" for k, v in SHAPE.items()] + [
        "--dataset=shakespeare", f"--out_dir={out}", "--gradient_accumulation_steps=1", f"--max_iters={iters - 1}",  # iterations 0..max_iters
        f"--lr_decay_iters={iters}", "--warmup_iters=0", "--eval_iters=1", "--eval_interval=100000",
        "--log_interval=1", "--always_save_checkpoint=False", "--device=cpu", "--dtype=float32",
        f"--compile={compile_}"]
    run = subprocess.run([sys.executable, str(checkout / "train.py"), *args], cwd=work, capture_output=True,
                         text=True)
    if run.returncode:
        raise SystemExit(f"nanoGPT failed:\n{run.stderr[-2000:]}")
    return [float(ms) for _, ms in ITER_LINE.findall(run.stdout)]


def nanoft_ms(work: Path, iters: int, compile_: str) -> list[float]:
    """nanoft's per-step times, ms, from metrics.jsonl's tokens/s (each step's own interval at log_interval=1)."""
    out = work / "out-nanoft"
    shutil.rmtree(out, ignore_errors=True)
    args = [f"--{k}={v}" for k, v in SHAPE.items()] + [
        f"--out_dir={out}", f"--max_iters={iters}", "--log_interval=1", "--eval_interval=100000",
        "--eval_iters=1", "--save_interval=100000", f"--compile={compile_}"]
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / "tiny.py"), *args],
                         cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"nanoft failed:\n{run.stderr[-2000:]}")
    tokens = SHAPE["batch_size"] * SHAPE["block_size"]
    return [1e3 * tokens / json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").open()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--compile", default="default", choices=["default", "True"],
                        help="default: each side's own CPU default; True: both torch.compile")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        raise SystemExit(f"error: --nanogpt {args.nanogpt} holds no train.py (a karpathy/nanoGPT checkout)")
    data = ROOT / "data" / "shakespeare"
    if not (data / "train.bin").is_file():
        raise SystemExit("error: no data/shakespeare/train.bin: run python data/prepare.py shakespeare first")
    times: dict[str, list[float]] = {"nanoGPT": [], "nanoft": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        (work / "data" / "shakespeare").symlink_to(data)  # nanoGPT reads data/<dataset>/{train,val}.bin
        for r in range(args.rounds):
            for name in times:
                ms = (nanogpt_ms(args.nanogpt, work, args.iters, args.compile == "True") if name == "nanoGPT"
                      else nanoft_ms(work, args.iters, "True" if args.compile == "True" else "auto"))
                if len(ms) != args.iters:
                    raise SystemExit(f"error: {name} logged {len(ms)} iterations, not {args.iters}")
                times[name] += ms[10:]
                print(f"round {r + 1} {name:>7}: median {statistics.median(ms[10:]):7.1f} ms/iter "
                      f"(first {ms[0]:.0f} ms)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"compile={args.compile}: nanoGPT {med['nanoGPT']:.1f} ms/iter, nanoft {med['nanoft']:.1f} ms/iter, "
          f"nanoft is {med['nanoGPT'] / med['nanoft']:.2f}x nanoGPT's speed")


if __name__ == "__main__":
    main()
