"""Optimizer state memory and step time on the 100M model, as ratios to torch.optim.AdamW (fused, as nanoft's "adamw" runs it; its unfused default has a row) and to
the bitsandbytes optimizer each one stands in for.

    python bench/bench_optim.py                       # configs/100m.py on this machine's device
    python bench/bench_optim.py --config=configs/tiny.py --steps=10
    python bench/bench_optim.py --config=configs/tiny.py --n_embd=256 --only='torch AdamW,torch AdamW unfused'

Only `optimizer.step()` is timed (the gradients are fixed random tensors, so no forward/backward), after
untimed steps that allocate the states (and compile the Triton kernels); the optimizers take turns step by step
and the median of --steps steps each is reported. On CUDA each timed step is bracketed by
torch.cuda.synchronize(), which waits for every stream: a paged optimizer's last write-backs are included.

"adamw8bit reference" is our AdamW8bit with backend="torch": the plain-PyTorch update the fast paths (Triton on
CUDA, the C loop on the CPU) are held to bit for bit.

The "bnb" column names the bitsandbytes optimizer a row is compared with: AdamW8bit for the non-paged ones,
and on CUDA PagedAdamW8bit / PagedAdamW for ours (bitsandbytes' paged optimizers have no CPU path).
bitsandbytes pages with CUDA unified memory, which stays on the GPU until memory runs short; ours moves every
page to the GPU and back each step, so without memory pressure bnb's paged step is an unpaged one.

State bytes count every distinct tensor the optimizer holds in its state (bitsandbytes' shared 256-entry code
maps once), divided by the trainable parameter count; "on device" is the part of it in device memory. Paged
states live in host memory (bitsandbytes' are unified memory and counted as device); on a CPU-only machine host
and device are the same memory, so the paging is pure overhead there and the column shows where the states
would be on a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nanoft.config import load_config
from nanoft.model.gpt import GPT
from nanoft.optim import Adafactor, AdamW8bit, PagedAdamW, PagedAdamW8bit, param_groups


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes in device memory, bytes in host memory) held by the optimizer's state tensors, each counted once."""
    seen, device, host = set(), 0, 0
    for p, state in opt.state.items():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                size = t.numel() * t.element_size()
                on_host = t.device.type == "cpu" and (p.is_cuda or isinstance(opt, PagedAdamW8bit) and opt.is_paged(p))
                host, device = (host + size, device) if on_host else (host, device + size)
    return device, host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/100m.py")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per optimizer, median reported "
                        "(default: 3 on the CPU, 20 on CUDA)")
    parser.add_argument("--only", default="", help="comma-separated subset of the optimizer labels")
    args, overrides = parser.parse_known_args()  # the rest: config overrides, --n_embd=256

    import bitsandbytes as bnb  # imported here: it is a test/benchmark dependency, not a runtime one

    cfg = load_config(args.config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    steps = args.steps or (20 if cuda else 3)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n_params = sum(p.numel() for p in params)
    groups = param_groups(model, cfg.weight_decay)
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # label -> (constructor, label of the bitsandbytes optimizer it is compared with)
    candidates = {
        "torch AdamW": (lambda g: torch.optim.AdamW(g, **adam, fused=True), "bnb AdamW8bit"),
        "torch AdamW unfused": (lambda g: torch.optim.AdamW(g, **adam), "bnb AdamW8bit"),
        "bnb AdamW8bit": (lambda g: bnb.optim.AdamW8bit(g, **adam, min_8bit_size=cfg.min_8bit_size),
                          "bnb AdamW8bit"),
        "adamw8bit": (lambda g: AdamW8bit(g, **adam, min_8bit_size=cfg.min_8bit_size), "bnb AdamW8bit"),
        "adamw8bit reference": (lambda g: AdamW8bit(g, **adam, min_8bit_size=cfg.min_8bit_size, backend="torch"),
                                "bnb AdamW8bit"),
        "paged_adamw": (lambda g: PagedAdamW(g, **adam, page_size=cfg.page_size),
                        "bnb PagedAdamW" if cuda else "bnb AdamW8bit"),
        "paged_adamw8bit": (lambda g: PagedAdamW8bit(g, **adam, min_8bit_size=cfg.min_8bit_size,
                                                     page_size=cfg.page_size),
                            "bnb PagedAdamW8bit" if cuda else "bnb AdamW8bit"),
        "adafactor": (lambda g: Adafactor(g, lr=None, relative_step=True), "bnb AdamW8bit"),
    }
    if cuda:
        candidates["bnb PagedAdamW8bit"] = (
            lambda g: bnb.optim.PagedAdamW8bit(g, **adam, min_8bit_size=cfg.min_8bit_size), "bnb PagedAdamW8bit")
        candidates["bnb PagedAdamW"] = (lambda g: bnb.optim.PagedAdamW(g, **adam), "bnb PagedAdamW")
    chosen = [c.strip() for c in args.only.split(",") if c.strip()] or list(candidates)
    for label in list(chosen):
        for required in ("torch AdamW", candidates[label][1]):  # the references the ratios are taken against
            if required not in chosen:
                chosen.insert(0, required)

    print(f"{args.config}: {n_params / 1e6:.1f}M trainable parameters on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}), median of {steps} steps")
    # all optimizers live at once and take turns, one step each per round: a change in the machine's load
    # then hits every optimizer alike instead of whichever happened to be running
    opts = {}
    for label in chosen:
        opts[label] = candidates[label][0]([dict(g) for g in groups])  # torch.optim fills defaults into the dicts
        for _ in range(2 if cuda else 1):  # allocate the states (and on CUDA compile the kernels): not timed
            opts[label].step()
    times: dict[str, list[float]] = {label: [] for label in chosen}
    for _ in range(steps):
        for label, opt in opts.items():
            if cuda:
                torch.cuda.synchronize()  # all streams: the step's kernels and copies finish inside the timing
            t0 = time.perf_counter()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - t0)
    results = {}
    for label, opt in opts.items():
        dev_bytes, host_bytes = state_bytes(opt)
        results[label] = (statistics.median(times[label]), (dev_bytes + host_bytes) / n_params, dev_bytes / n_params)

    ref_t, ref_b, _ = results["torch AdamW"]
    print()
    print(f"{'optimizer':<18} {'state B/param':>13} {'on device':>9} {'vs AdamW':>8} | "
          f"{'step ms':>9} {'vs AdamW':>8} {'vs bnb':>6}  bnb")
    for label, (seconds, bpp, dev_bpp) in results.items():
        bnb_label = candidates[label][1]
        bnb_t = results[bnb_label][0]
        print(f"{label:<18} {bpp:>13.3f} {dev_bpp:>9.3f} {bpp / ref_b:>8.3f} | "
              f"{seconds * 1e3:>9.2f} {seconds / ref_t:>8.2f} {seconds / bnb_t:>6.2f}  {bnb_label}")


if __name__ == "__main__":
    main()
