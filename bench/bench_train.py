"""Training-step speed of configs/tiny.py (or any config) on this machine, as ratios to the plain path: float32,
no compile, the full (B*T, vocab) logits and F.cross_entropy (what train.py did before the chunked loss).

    python bench/bench_train.py                                  # tok/s, MFU, and the compile cost
    python bench/bench_train.py --steps=10 --no-compile          # quicker: the eager variants only
    python bench/bench_train.py --memory                         # peak memory of one step, one process per variant

Every variant is a fresh GPT with the same initial weights and batches, trained by AdamW as train.py trains.
They take turns step by step (one step of each, then the next round), so a busy machine slows all of them alike:
read the ratios, not the absolute numbers. The median step of each is reported after one untimed warm-up step.
"compiled" is torch.compile of the bf16 chunked model; its first step (and first eval, which compiles again:
eval mode without gradients is another graph) is reported as the compile cost, and "pays back after" is that
cost divided by the time it saves per step: the run length (in steps) from which compiling ends a run sooner.

--memory runs one training step per variant in a fresh process and reports the growth of its peak resident
memory (ru_maxrss) over what it held before the step (model, batch): the step's activations, logits and
gradients, and the optimizer states that the first step allocates (the same for every variant).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from nanoft.config import load_config
from nanoft.model.gpt import GPT
from nanoft.run.flops import flops_per_token, peak_flops

VARIANTS = {  # name: (autocast dtype, full logits?)
    "float32 full logits (reference)": (torch.float32, True),
    "float32 chunked": (torch.float32, False),
    "bf16 full logits": (torch.bfloat16, True),
    "bf16 chunked": (torch.bfloat16, False),
}


class Runner:
    def __init__(self, cfg, dtype: torch.dtype, full_logits: bool, compile: bool = False):
        torch.manual_seed(0)
        self.cfg, self.dtype, self.full_logits = cfg, dtype, full_logits
        self.model = GPT(cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.forward = torch.compile(self.model) if compile else self.model
        self.flops = flops_per_token(self.model, cfg.n_layer, cfg.block_size, cfg.n_embd)
        self.times: list[float] = []

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The chunked loss, or the plain path: the full (B, T, vocab) logits, then F.cross_entropy."""
        if not self.full_logits:
            return self.forward(x, y)
        logits = self.forward(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", self.dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        with self.autocast():
            loss = self.loss(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.model.eval()
        with torch.no_grad(), self.autocast():
            self.loss(x, y)
        self.model.train()
        return time.perf_counter() - t0


def batches(cfg, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size), generator=g)
        yield x, torch.roll(x, -1, dims=1)


def speed(cfg, steps: int, compile: bool) -> None:
    runners = {name: Runner(cfg, dtype, full) for name, (dtype, full) in VARIANTS.items()}
    compile_cost = 0.0
    if compile:
        runners["bf16 chunked, compiled"] = compiled = Runner(cfg, torch.bfloat16, False, compile=True)
        x, y = next(batches(cfg, 1, seed=99))
        first, first_eval = compiled.step(x, y), compiled.eval_step(x, y)
    tokens = cfg.batch_size * cfg.block_size
    for i, (x, y) in enumerate(batches(cfg, steps + 1)):
        for r in runners.values():
            t = r.step(x, y)
            if i > 0:  # the first is a warm-up (thread pools, the optimizer's states)
                r.times.append(t)
    if compile:  # what the compiled run pays up front, beyond a steady step: training graph, then eval graph
        eager_eval = statistics.median(runners["bf16 chunked"].eval_step(x, y) for _ in range(3))
        steady_eval = statistics.median(compiled.eval_step(x, y) for _ in range(3))
        compile_cost = first - statistics.median(compiled.times) + first_eval - steady_eval
        print(f"compile: {compile_cost:.1f} s (first training step {first:.1f} s, first eval {first_eval:.1f} s); "
              f"eval forward eager {eager_eval:.2f} s, compiled {steady_eval:.2f} s")
    ref = statistics.median(runners["float32 full logits (reference)"].times)
    base = statistics.median(runners["bf16 chunked"].times)
    print(f"{cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, batch {cfg.batch_size} x {cfg.block_size}, "
          f"{steps} timed steps each, taking turns; {torch.get_num_threads()} threads")
    print(f"{'variant':34s} {'step s':>8s} {'tok/s':>8s} {'vs ref':>7s} {'MFU':>6s}")
    for name, r in runners.items():
        t = statistics.median(r.times)
        mfu = r.flops * tokens / t / peak_flops("cpu", r.dtype)[0]
        print(f"{name:34s} {t:8.3f} {tokens / t:8.0f} {ref / t:6.2f}x {100 * mfu:5.1f}%")
    if compile:
        saved = base - statistics.median(compiled.times)
        payback = f"{compile_cost / saved:.0f} steps" if saved > 0 else "never (no faster per step)"
        print(f"compiling pays back after {payback} (saves {saved:.3f} s/step against bf16 chunked eager)")
    print("peak FLOP/s (measured matmul): " + ", ".join(
        f"{str(d).removeprefix('torch.')} {peak_flops('cpu', d)[0] / 1e9:.0f} G" for d in (torch.float32, torch.bfloat16)))


def one_step_memory(cfg, name: str) -> None:
    """In a fresh process: the growth of the peak RSS over one training step of variant `name`, in MiB."""
    dtype, full = VARIANTS[name]
    r = Runner(cfg, dtype, full)
    x, y = next(batches(cfg, 1))
    before = _current_rss()
    r.step(x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"name": name, "step_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20}))


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory(config: str, overrides: list[str]) -> None:
    print("peak memory of one training step (growth of the peak RSS over the model and batch; fresh process each):")
    results = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, config, f"--one-step-memory={name}", *overrides],
                             capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    ref = results["float32 full logits (reference)"]["step_mib"]
    for name, r in results.items():
        print(f"  {name:34s} {r['step_mib']:8.0f} MiB  ({r['step_mib'] / ref:.2f}x; process peak {r['peak_mib']:.0f} MiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/tiny.py")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--one-step-memory", default="", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    cfg = dataclasses.replace(load_config(args.config, overrides), dropout=0.0)
    if args.one_step_memory:
        one_step_memory(cfg, args.one_step_memory)
    elif args.memory:
        memory(args.config, overrides)
    else:
        speed(cfg, args.steps, compile=not args.no_compile)


if __name__ == "__main__":
    main()
