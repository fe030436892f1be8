"""Every optimizer under FSDP2 (`fully_shard`, 2 and 3 gloo processes on loopback) against one process.

One spawn per world size runs all four optimizers on a small model whose shard boundaries cut 8-bit blocks
(rows of 24 and 100 values: 2 ranks start at elements 1200 and 1850, 3 ranks at 816, 1300, ...), with
min_8bit_size between the whole weights' numel and their shards' (the whole tensor decides: 8-bit states).

- real training: per-step losses equal one process's within float32 tolerance (FSDP sums gradients in
  another order, so the states then differ by rounding too: compared within tolerance);
- the same gradients given to both: gathered parameters and states equal one process's bit for bit for the
  AdamW family (8-bit codes and absmax included: block maxima are exact in any order); Adafactor's sums over
  rows are all-reduced, another order, so its states and parameters agree to float32 rounding;
- checkpoints: one process's state after 2 steps loaded by every rank continues to the one process's step 3,
  and the gathered state loads into one process (1 -> N and N -> 1, so also 2 -> 3).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import run_ranks
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from nanoft.optim import Adafactor, AdamW8bit, PagedAdamW, PagedAdamW8bit, param_groups
from nanoft.run import distributed

STEPS = 3
OPTIMIZERS = {
    "adamw8bit": lambda g: AdamW8bit(g, lr=1e-2, betas=(0.9, 0.95), min_8bit_size=2000),
    "paged_adamw": lambda g: PagedAdamW(g, lr=1e-2, betas=(0.9, 0.95), page_size=512, min_paged_size=1000),
    "paged_adamw8bit": lambda g: PagedAdamW8bit(g, lr=1e-2, betas=(0.9, 0.95), min_8bit_size=2000, page_size=512,
                                                min_paged_size=1000),
    "adafactor": lambda g: Adafactor(g, lr=None, relative_step=True),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(24, 100), nn.LayerNorm(100), nn.Linear(100, 37)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 24, generator=gen), torch.randn(6, 37, generator=gen)  # 6 rows: 2 or 3 per rank


def fixed_grads(model, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(200 + step)
    return [torch.randn(p.shape, generator=gen) * 0.01 * step for p in model.parameters()]


def build(name: str, mesh):
    torch.manual_seed(0)
    model = Net()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.fc1, mesh=mesh)
        fully_shard(model.fc2, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, OPTIMIZERS[name](param_groups(model, 0.1))


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def set_grads(model, grads, rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    for p, g in zip(model.parameters(), grads):
        if isinstance(p, DTensor):
            rows = -(-p.shape[0] // world)
            local = g[rank * rows: (rank + 1) * rows].clone()
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        else:
            p.grad = g.clone()


def load_params(model, weights, rank: int, world: int) -> None:
    """Whole weights into the model: each rank copies its rows (torch.chunk's: ceil(rows / world) each)."""
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            local = p.to_local() if hasattr(p, "to_local") else p
            first = min(rank * -(-w.shape[0] // world), w.shape[0])
            local.copy_(w[first: first + local.shape[0]])


def snapshot(model, opt) -> dict:
    """Copies of the whole parameters and optimizer state (every rank must call)."""
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in opt.state_dict()["state"].items()}
    return {"params": [whole(p) for p in model.parameters()], "state": state}


def run_all(rank: int = 0, world: int = 1, mesh=None, start: dict | None = None) -> dict:
    """For each optimizer: real training (losses), the fixed-gradient run (snapshots after 2 and 3 steps), and
    the fixed-gradient step 3 resumed from `start[name]` (one process's snapshot after 2 steps)."""
    out = {}
    for name in OPTIMIZERS:
        model, opt = build(name, mesh)
        losses = []
        for step in range(1, STEPS + 1):
            x, y = batch(step)
            rows = slice(rank * 6 // world, (rank + 1) * 6 // world)
            loss = F.mse_loss(model(x[rows]), y[rows])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(distributed.mean_across_ranks(loss.detach(), distributed.Dist(rank, rank, world)).item())
        trained = snapshot(model, opt)

        model, opt = build(name, mesh)
        fixed = {}
        for step in range(1, STEPS + 1):
            set_grads(model, fixed_grads(model, step), rank, world)
            opt.step()
            fixed[step] = snapshot(model, opt)
        resumed = None
        if start is not None:
            model, opt = build(name, mesh)
            load_params(model, start[name]["params"], rank, world)
            saved = {"state": start[name]["state"], "param_groups": opt.state_dict()["param_groups"]}
            distributed.load_optimizer_state(opt, saved, distributed.Dist(rank, rank, world, fsdp=mesh is not None))
            set_grads(model, fixed_grads(model, STEPS), rank, world)
            opt.step()
            resumed = snapshot(model, opt)
        out[name] = {"losses": losses, "trained": trained, "fixed": fixed, "resumed": resumed}
    return out


def _rank(rank: int, world: int, start: dict) -> dict:
    return run_all(rank, world, init_device_mesh("cpu", (world,)), start)


@pytest.fixture(scope="module")
def one_process() -> dict:
    return run_all()


def same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def close(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6)


def compare(got: dict, want: dict, exact: bool) -> None:
    check = same if exact else close
    for i, (a, b) in enumerate(zip(got["params"], want["params"])):
        assert check(a, b), f"parameter {i}"
    assert got["state"].keys() == want["state"].keys()
    for i in want["state"]:
        for k, v in want["state"][i].items():
            if isinstance(v, torch.Tensor):
                assert check(got["state"][i][k], v), (i, k)
            else:
                assert got["state"][i][k] == v, (i, k)


@pytest.mark.parametrize("world", [2, 3])
def test_every_optimizer_under_fsdp_equals_one_process(world, one_process, tmp_path):
    start = {name: r["fixed"][STEPS - 1] for name, r in one_process.items()}
    sharded = run_ranks(_rank, world, start)[0]
    for name, want in one_process.items():
        got = sharded[name]
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5), name
        compare(got["trained"], want["trained"], exact=False)
        exact = name != "adafactor"  # its row sums are all-reduced: another summation order
        for step in range(1, STEPS + 1):
            compare(got["fixed"][step], want["fixed"][step], exact)
        compare(got["resumed"], want["fixed"][STEPS], exact)  # one process -> N processes
        # N processes -> one: the gathered state is a plain one-process state dict
        model, opt = build(name, None)
        load_params(model, got["fixed"][STEPS]["params"], 0, 1)
        opt.load_state_dict({"state": got["fixed"][STEPS]["state"], "param_groups": opt.state_dict()["param_groups"]})
        set_grads(model, fixed_grads(model, STEPS + 1), 0, 1)
        opt.step()
        ref_model, ref_opt = build(name, None)
        for step in range(1, STEPS + 2):
            set_grads(ref_model, fixed_grads(ref_model, step), 0, 1)
            ref_opt.step()
        compare(snapshot(model, opt), snapshot(ref_model, ref_opt), exact)
