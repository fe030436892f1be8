"""nanoft.memory_measure under FSDP2: each of 2 gloo ranks counts its own shards (DTensors' local tensors) of the
parameters, gradients and AdamW states: half of what one process holds, since every dimension here is even."""
import dataclasses
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanoft import distributed
from nanoft.config import load_config
from nanoft.memory_estimate import Run
from nanoft.memory_measure import exact_bytes, measured_breakdown
from nanoft.memory_peak import peak_bytes
from nanoft.memory_sharded import per_rank
from nanoft.model_shape import ModelShape
from nanoft.model import GPT

SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--device=cpu", "--dropout=0.0"]


def run_one_step(model: torch.nn.Module) -> dict:
    """One AdamW step; the bytes counted with the gradients alive and after the step, and the state's step
    counters (plain 0-d tensors, whole on every rank)."""
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 50304, (2, 16))
    model(x, x)[1].backward()
    grads = exact_bytes(model, None)["grads"]
    optimizer.step()
    got = exact_bytes(model, optimizer)
    steps = sum(s["step"].untyped_storage().nbytes() for s in optimizer.state.values())
    optimizer.zero_grad(set_to_none=True)
    return {**got, "grads": grads, "steps": steps, "text": measured_breakdown(model, optimizer)}


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = distributed.place(GPT(load_config("configs/tiny.py", SMALL)), distributed.Dist(rank, rank, 2, fsdp=True),
                              "cpu")
    reports = [None, None]
    dist.all_gather_object(reports, run_one_step(model))
    if rank == 0:
        Path(out).write_text(json.dumps(reports))
    dist.destroy_process_group()


def test_each_rank_counts_its_shards_of_params_grads_and_states(tmp_path):
    torch.manual_seed(0)
    one = run_one_step(GPT(load_config("configs/tiny.py", SMALL)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's traffic on loopback
    mp.spawn(_rank, args=(port, str(tmp_path / "reports.json")), nprocs=2)
    for rank in json.loads((tmp_path / "reports.json").read_text()):
        assert rank["params"] == one["params"] // 2 > 0
        assert rank["grads"] == one["grads"] // 2 > 0
        assert rank["steps"] == one["steps"]  # AdamW's step counters are not sharded
        assert rank["states"] - rank["steps"] == (one["states"] - one["steps"]) // 2 > 0  # exp_avg, exp_avg_sq
        assert "this rank's shards" in rank["text"] and "this rank's shards" not in one["text"]
    # and the estimator's per-rank figure (nanoft.memory_sharded) is what each rank holds, byte for byte
    cfg = dataclasses.replace(load_config("configs/tiny.py", SMALL), fsdp=True)
    shape, run = ModelShape.from_config(cfg), Run.from_config(cfg)
    est = per_rank(peak_bytes(shape, run), shape, run, 2)
    for rank in json.loads((tmp_path / "reports.json").read_text()):
        assert (est["params"], est["grads"], est["states"]) == (rank["params"], rank["grads"], rank["states"])
