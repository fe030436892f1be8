"""nanoft.run.memory_measure under FSDP2: each of 2 gloo ranks counts its own shards (DTensors' local tensors) of the
parameters, gradients and AdamW states: half of what one process holds, since every dimension here is even."""
import dataclasses

import torch
from helpers import run_ranks

from nanoft.config import load_config
from nanoft.model.gpt import GPT
from nanoft.run import distributed
from nanoft.run.memory_measure import exact_bytes, measured_breakdown
from nanoft.tools.memory.estimate import Run
from nanoft.tools.memory.peak import peak_bytes
from nanoft.tools.memory.shape import ModelShape
from nanoft.tools.memory.sharded import per_rank

SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--device=cpu", "--dropout=0.0"]


def run_one_step(model: torch.nn.Module) -> dict:
    """One AdamW step; the bytes counted with the gradients alive and after the step, and the state's step
    counters (plain 0-d tensors, whole on every rank)."""
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 50304, (2, 16))
    model(x, x).backward()
    grads = exact_bytes(model, None)["grads"]
    optimizer.step()
    got = exact_bytes(model, optimizer)
    steps = sum(s["step"].untyped_storage().nbytes() for s in optimizer.state.values())
    optimizer.zero_grad(set_to_none=True)
    return {**got, "grads": grads, "steps": steps, "text": measured_breakdown(model, optimizer)}


def _rank(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = distributed.place(GPT(load_config("configs/tiny.py", SMALL)),
                              distributed.Dist(rank, rank, world, fsdp=True), "cpu")
    return run_one_step(model)


def test_each_rank_counts_its_shards_of_params_grads_and_states():
    torch.manual_seed(0)
    one = run_one_step(GPT(load_config("configs/tiny.py", SMALL)))
    ranks = run_ranks(_rank, 2)
    for rank in ranks:
        assert rank["params"] == one["params"] // 2 > 0
        assert rank["grads"] == one["grads"] // 2 > 0
        assert rank["steps"] == one["steps"]  # AdamW's step counters are not sharded
        assert rank["states"] - rank["steps"] == (one["states"] - one["steps"]) // 2 > 0  # exp_avg, exp_avg_sq
        assert "this rank's shards" in rank["text"] and "this rank's shards" not in one["text"]
    # and the estimator's per-rank figure (nanoft.tools.memory.sharded) is what each rank holds, byte for byte
    cfg = dataclasses.replace(load_config("configs/tiny.py", SMALL), fsdp=True)
    shape, run = ModelShape.from_config(cfg), Run.from_config(cfg)
    est = per_rank(peak_bytes(shape, run), shape, run, 2)
    for rank in ranks:
        assert (est["params"], est["grads"], est["states"]) == (rank["params"], rank["grads"], rank["states"])
