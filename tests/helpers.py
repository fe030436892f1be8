"""What several tests share: where a kernel backend runs, bitsandbytes' CPU library, torch's thread count, and
starting ranks as torchrun does. Fixtures live in conftest.py; plain helpers here, imported by name."""
import contextlib
import datetime
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanoft.run import distributed

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]


def device_for(backend: str) -> str:
    """Where a kernel backend runs: Triton on the GPU when there is one (else the interpreter on the CPU);
    the PyTorch reference always on the CPU, where bitsandbytes' reference functions also run."""
    return "cuda" if backend == "triton" and CUDA else "cpu"


def bnb_native_cpu() -> bool:
    """Whether bitsandbytes runs CPU tensors through its C CPU library. A CUDA build loads its CUDA library
    instead, and its CPU ops then fall back to its PyTorch backend, which rounds a few half-precision outputs
    differently (seen on an H100 host: 2 of 1,000 fp16 values, 1 ulp) and has no row bug (tests/kernels/test_nf4_kernels.py).
    Where it falls back, the tests hold us to the specification both follow: float32 maths, rounded once."""
    import bitsandbytes.cextension as ext
    return type(ext.lib).__name__ != "CudaBNBNativeLibrary"


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torchrun(nproc: int) -> list[str]:
    """`python -m` arguments that start nproc workers on this machine as torchrun does. --standalone: the
    rendezvous binds a free port itself (port 0), so no port is chosen first and taken by another program
    before it is used."""
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_ranks(fn, world: int, *args) -> list:
    """fn(rank, world, *args) in `world` fresh processes joined by one gloo process group on loopback, as
    torchrun starts train.py; returns what each rank's fn returned (anything torch.save keeps)."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_one_rank, args=(fn, world, out, args), nprocs=world)
        return [torch.load(Path(out) / f"{rank}.pt", weights_only=False) for rank in range(world)]


def _one_rank(rank: int, fn, world: int, out: str, args: tuple) -> None:
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's traffic on loopback
    torch.set_num_threads(1)  # world processes share this machine's cores
    # the ranks meet in a file, not on a port another program could take between choosing and binding it; a
    # rank that never arrives fails the test in 2 minutes, not torch's default 30
    store = dist.FileStore(str(Path(out) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=2))
    result = fn(rank, world, *args)
    distributed.teardown()  # after fn returned, as train.py does: see teardown for the abort it avoids
    torch.save(result, Path(out) / f"{rank}.pt")
