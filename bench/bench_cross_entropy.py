"""The LM head's loss on the CPU: the chunked loss's C kernel (kernels/cross_entropy_cpu.py) against its PyTorch
reference and against torch's F.cross_entropy, side by side, and the whole linear + cross-entropy against the
plain path (full logits + F.cross_entropy).

    python bench/bench_cross_entropy.py                   # 2048 rows (16 x 128), V = 50304, C = 256, bf16
    python bench/bench_cross_entropy.py --rows 1024 --dtype float32

Part 1, the softmax cross-entropy and dL/dz of one chunk of logits (rows x V) already made:
    kernel      rows_cpu: one read, one write of dL/dz over the logits
    reference   rows_reference + the cast to the logits' dtype (what the chunked loss ran before the kernel)
    torch       F.cross_entropy on the float32 upcast, forward + backward (its gradient, cast back)
Part 2, loss and both gradients of hidden (rows, C) and a tied head (V, C), under autocast:
    chunked     nanoft.model.chunked_loss.linear_cross_entropy (the kernel inside)
    plain       reference_cross_entropy: the (rows, V) logits, F.cross_entropy, autograd
Contenders take turns (one call of each per round); medians; ratios = their time / the first row's.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nanoft.kernels import cross_entropy_cpu as xent
from nanoft.model.chunked_loss import linear_cross_entropy, reference_cross_entropy


def race(fns: dict, rounds: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def show(title: str, med: dict[str, float]) -> None:
    first = next(iter(med.values()))
    print(title)
    for name, t in med.items():
        print(f"  {name:>10}: {1e3 * t:8.1f} ms  {t / first:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"threads {torch.get_num_threads()}, C kernel built: {xent.available()}, {args.rows} rows x V "
          f"{args.vocab}, C {args.width}, {args.dtype}")
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(args.rows, args.vocab, generator=g) * 3).to(dtype)
    y = torch.randint(0, args.vocab, (args.rows,), generator=g)
    scale = torch.full((args.rows,), 1.0 / args.rows)
    work = z.clone()

    def kernel():
        work.copy_(z)  # the kernel overwrites its input: every call starts from the same logits
        xent.rows_cpu(work, y, scale, grad=True)

    def reference():
        work.copy_(z)
        xent.rows_reference(work, y, scale, grad=True)[1].to(dtype)

    def torch_ce():
        work.copy_(z)
        z32 = work.float().requires_grad_()
        F.cross_entropy(z32, y).backward()
        z32.grad.to(dtype)

    show("softmax cross-entropy + dL/dz of the logits (each includes one copy of them, to start afresh):",
         race({"kernel": kernel, "reference": reference, "torch": torch_ce}, args.rounds))
    hidden = torch.randn(args.rows, args.width, generator=g, requires_grad=True)
    weight = (torch.randn(args.vocab, args.width, generator=g) * 0.02).requires_grad_()

    def step(loss_fn):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            loss = loss_fn(hidden, weight, y)
        loss.backward()

    show("linear + cross-entropy, loss and both gradients:",
         race({"chunked": lambda: step(linear_cross_entropy), "plain": lambda: step(reference_cross_entropy)},
              args.rounds))


if __name__ == "__main__":
    main()
