"""Training throughput, one process against torchrun's 2 processes (DDP and FSDP2), same global batch.

    python bench/bench_distributed.py                      # configs/tiny.py, 30 steps each
    python bench/bench_distributed.py --steps=50 --global_batch=32 --losses --extra --n_layer=6

Runs train.py as a user would and reads tokens/s from out_dir/metrics.jsonl (the median over the steps
after the first few, so start-up and warm-up do not count). Every run sees the same global batch: one
process takes batch_size=global_batch, each of the 2 ranks takes global_batch / 2. On a CPU the processes
share the cores: the single process gets all of them as threads, each rank gets cores / 2 threads, so this
measures what data parallelism costs or gains on the same machine, not the scaling across GPUs.
Prints each mode's tokens/s and its ratio to the single process, and the largest per-step loss difference.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out_dir: Path, nproc: int, threads: int, args: list[str]) -> dict[int, dict]:
    cmd = [sys.executable, "train.py", *args, f"--out_dir={out_dir}"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), NANOFT_OFFLINE="1")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the median")
    ap.add_argument("--global_batch", type=int, default=16)
    ap.add_argument("--losses", action="store_true", help="also print every step's loss in each mode")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more --key=value for train.py")
    a = ap.parse_args()
    cores = os.cpu_count() or 2
    common = [a.config, f"--max_iters={a.steps}", "--log_interval=1", f"--eval_interval={10 ** 9}", "--eval_iters=1",
              f"--save_interval={10 ** 9}", "--dropout=0.0", "--device=cpu", *a.extra]
    modes = [  # name, processes, threads per process, extra arguments
        ("1 process", 1, cores, [f"--batch_size={a.global_batch}"]),
        ("1 process, 1 thread", 1, 1, [f"--batch_size={a.global_batch}"]),
        ("DDP, 2 processes", 2, max(1, cores // 2), [f"--batch_size={a.global_batch // 2}"]),
        ("FSDP2, 2 processes", 2, max(1, cores // 2), [f"--batch_size={a.global_batch // 2}", "--fsdp=True"]),
    ]
    print(f"{a.config} {' '.join(a.extra)}: global batch {a.global_batch}, {a.steps} steps, median of steps "
          f"{a.skip + 1}..{a.steps}, {cores} cores, load average {os.getloadavg()[0]:.1f} before")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, nproc, threads, extra) in enumerate(modes):
            results[name] = run(Path(tmp) / str(i), nproc, threads, common + extra)
    ref_name = modes[0][0]
    ref = results[ref_name]
    ref_tps = statistics.median(ref[s]["tokens_per_s"] for s in range(a.skip + 1, a.steps + 1))
    print(f"{'mode':<22} {'threads':>7} {'tokens/s':>10} {'vs 1 process':>13} {'max |loss diff|':>16}")
    for name, nproc, threads, _ in modes:
        rec = results[name]
        tps = statistics.median(rec[s]["tokens_per_s"] for s in range(a.skip + 1, a.steps + 1))
        diff = max(abs(rec[s]["loss"] - ref[s]["loss"]) for s in ref)
        print(f"{name:<22} {f'{nproc}x{threads}':>7} {tps:>10.0f} {tps / ref_tps:>12.2f}x {diff:>16.2e}")
    print(f"load average {os.getloadavg()[0]:.1f} after (other processes on the cores make every number lower)")
    if a.losses:
        print(f"{'step':>4} " + " ".join(f"{name:>22}" for name, *_ in modes))
        for step in sorted(ref):
            print(f"{step:>4} " + " ".join(f"{results[name][step]['loss']:>22.7f}" for name, *_ in modes))


if __name__ == "__main__":
    main()
