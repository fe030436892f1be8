"""Optimizer state memory and step time on the 100M model, as ratios to torch.optim.AdamW and to
bitsandbytes.optim.AdamW8bit.

    python bench/bench_optim.py                       # configs/100m.py on this machine's device
    python bench/bench_optim.py --config=configs/tiny.py --steps=10

Only `optimizer.step()` is timed (the gradients are fixed random tensors, so no forward/backward), after one
untimed step that allocates the states; the optimizers take turns step by step and the median of --steps
steps each is reported. State bytes count every
distinct tensor the optimizer holds in its state (bitsandbytes' shared 256-entry code maps once), divided by
the trainable parameter count. Paged optimizers hold those bytes in host memory; on a CPU-only machine host
and device are the same memory, so the paging is pure overhead there.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nanoft.config import load_config
from nanoft.model import GPT
from nanoft.optim import Adafactor, AdamW8bit, PagedAdamW, PagedAdamW8bit, param_groups


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes in device memory, bytes in host memory) held by the optimizer's state tensors, each counted once."""
    seen, device, host = set(), 0, 0
    for state in opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                size = t.numel() * t.element_size()
                if isinstance(opt, (PagedAdamW, PagedAdamW8bit)):
                    host += size
                else:
                    device += size
    return device, host


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # a CPU-GPU sync point: the step's kernels must finish inside the timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/100m.py")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per optimizer (median reported)")
    parser.add_argument("--only", default="", help="comma-separated subset of the optimizer labels")
    args = parser.parse_args()

    import bitsandbytes as bnb  # imported here: it is a test/benchmark dependency, not a runtime one

    cfg = load_config(args.config, [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n_params = sum(p.numel() for p in params)
    groups = param_groups(model, cfg.weight_decay)
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    candidates = {
        "torch AdamW": lambda g: torch.optim.AdamW(g, **adam, fused=True if device.type == "cuda" else None),
        "bnb AdamW8bit": lambda g: bnb.optim.AdamW8bit(g, **adam, min_8bit_size=cfg.min_8bit_size),
        "adamw8bit": lambda g: AdamW8bit(g, **adam, min_8bit_size=cfg.min_8bit_size),
        "paged_adamw": lambda g: PagedAdamW(g, **adam, page_size=cfg.page_size),
        "paged_adamw8bit": lambda g: PagedAdamW8bit(g, **adam, min_8bit_size=cfg.min_8bit_size,
                                                    page_size=cfg.page_size),
        "adafactor": lambda g: Adafactor(g, lr=None, relative_step=True),
    }
    chosen = [c.strip() for c in args.only.split(",") if c.strip()] or list(candidates)
    for required in ("torch AdamW", "bnb AdamW8bit"):
        if required not in chosen:
            chosen.insert(0, required)  # the references the ratios are taken against

    print(f"{args.config}: {n_params / 1e6:.1f}M trainable parameters on {device} "
          f"({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}), median of {args.steps} steps")
    # all optimizers live at once and take turns, one step each per round: a change in the machine's load
    # then hits every optimizer alike instead of whichever happened to be running
    opts = {}
    for label in chosen:
        opts[label] = candidates[label]([dict(g) for g in groups])  # torch.optim fills defaults into the dicts
        opts[label].step()  # the first step allocates the states: not timed
    times: dict[str, list[float]] = {label: [] for label in chosen}
    for _ in range(args.steps):
        for label, opt in opts.items():
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            times[label].append(time.perf_counter() - t0)
    results = {}
    for label, opt in opts.items():
        dev_bytes, host_bytes = state_bytes(opt)
        results[label] = (statistics.median(times[label]), (dev_bytes + host_bytes) / n_params, dev_bytes / n_params)

    ref_t, ref_b, _ = results["torch AdamW"]
    bnb_t, bnb_b, _ = results["bnb AdamW8bit"]
    print()
    print(f"{'optimizer':<16} {'state B/param':>13} {'on device':>9} {'vs AdamW':>8} {'vs bnb8':>7} | "
          f"{'step ms':>8} {'vs AdamW':>8} {'vs bnb8':>7}")
    for label, (seconds, bpp, dev_bpp) in results.items():
        print(f"{label:<16} {bpp:>13.3f} {dev_bpp:>9.3f} {bpp / ref_b:>8.3f} {bpp / bnb_b:>7.3f} | "
              f"{seconds * 1e3:>8.0f} {seconds / ref_t:>8.2f} {seconds / bnb_t:>7.2f}")


if __name__ == "__main__":
    main()
