"""LoRA and QLoRA under FSDP2 (`fully_shard`, 2 gloo processes on loopback) against one process.

A real GPT with real adapters (nanoft.peft.methods.LoRA.apply), sharded by nanoft.run.distributed.place and trained
3 steps with the run's optimizer on the same global batch: the per-step losses equal one process's within float32
tolerance (FSDP sums the two halves' gradients in another order), and the adapter tensors a checkpoint holds
(LoRA.saved on rank 0 after distributed.full_state_dict: what train.py's save does) equal one
process's. The adapters stay whole on every rank (their gradients averaged as DDP does); the frozen base shards.
For QLoRA, each rank holds half of every NF4 weight's packed uint8 codes and of its block scales.
"""
import contextlib
import dataclasses

import pytest
import torch
from helpers import run_ranks
from torch.distributed.tensor import DTensor

from nanoft.config import Config
from nanoft.model.gpt import GPT
from nanoft.optim import make_optimizer
from nanoft.peft.methods import LoRA
from nanoft.quant.nf4 import Linear4bit
from nanoft.run import distributed

STEPS, ROWS = 3, 4  # 4 rows of global batch: 2 per rank
CFG = Config(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=256, dropout=0.0, lora_dropout=0.0,
             device="cpu", dtype="float32", lr=1e-2, lora_r=4, lora_alpha=8, lora_train_norms=True)


def train(finetune: str, rank: int = 0, world: int = 1) -> dict:
    cfg = dataclasses.replace(CFG, finetune=finetune)
    d = distributed.Dist(rank, rank, world, fsdp=world > 1)
    torch.manual_seed(0)  # every rank builds the same weights (and quantizes them the same way)
    model = LoRA.apply(GPT(cfg), cfg, "cpu")
    model = distributed.place(model, d, "cpu", torch.float32)
    optimizer = make_optimizer(cfg, model)
    tokens = torch.randint(0, cfg.vocab_size, (ROWS, cfg.block_size + 1), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(STEPS):  # one global batch, learnt a little more each step
        rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        loss = model(tokens[rows, :-1], tokens[rows, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(distributed.mean_across_ranks(loss.detach(), d).item())
    # what one rank holds of the first NF4 weight: (its packed codes, all codes), (its scales, all scales)
    nf4 = next((m for m in model.modules() if isinstance(m, Linear4bit)), None)
    held = None
    if nf4 is not None and world > 1:
        held = [(p.to_local().numel(), p.numel(), p.dtype) for p in (nf4.nf4_packed, nf4.nf4_absmax)]
    gathers = {}  # how many sharded tensors a save's full_state_dict all-gathers, with and without the weights
    for weights in (True, False):  # False: what train.py's save runs first for LoRA (every rank joins)
        with counted_gathers() as shapes:
            weights_saved, optim = distributed.full_state_dict(model, optimizer, d, weights=weights)
        gathers[weights] = len(shapes)
    adapters = LoRA.saved(model)[0] if d.is_master else None  # as train.py saves: on rank 0 alone
    return {"losses": losses, "adapters": adapters, "held": held, "gathers": gathers, "weights_saved": weights_saved,
            "optim": optim}


@contextlib.contextmanager
def counted_gathers():
    """The shapes of the DTensors all-gathered inside: the real DTensor.full_tensor, each call counted."""
    shapes, full_tensor = [], DTensor.full_tensor

    def counted(self, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = counted
    try:
        yield shapes
    finally:
        DTensor.full_tensor = full_tensor


def _rank(rank: int, world: int) -> dict:
    return {finetune: train(finetune, rank, world) for finetune in ("lora", "qlora")}


@pytest.fixture(scope="module")
def sharded() -> dict:
    return run_ranks(_rank, 2)[0]


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_lora_under_fsdp_equals_one_process(finetune, sharded):
    want, got = train(finetune), sharded[finetune]
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert want["losses"][-1] < want["losses"][0] - 0.02  # it trained
    assert got["adapters"].keys() == want["adapters"].keys()
    assert any(k.endswith("lora_B") for k in want["adapters"]) and any(k.startswith("ln_f") for k in want["adapters"])
    for k, v in want["adapters"].items():
        assert not isinstance(got["adapters"][k], torch.distributed.tensor.DTensor), k  # a whole tensor
        assert got["adapters"][k].shape == v.shape and got["adapters"][k].dtype == v.dtype, k
        torch.testing.assert_close(got["adapters"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    # a save gathers nothing: the adapters and their optimizer states are whole on every rank (the frozen base, which
    # gathering the weights would bring to rank 0, is not saved); the state equals one process's
    assert got["gathers"][False] == 0 < got["gathers"][True] and got["weights_saved"] == {}
    assert got["optim"]["state"].keys() == want["optim"]["state"].keys()
    for i, slots in want["optim"]["state"].items():
        for k, v in slots.items():
            torch.testing.assert_close(got["optim"]["state"][i][k], v, rtol=1e-4, atol=1e-6, msg=f"{i} {k}")
    if finetune == "qlora":  # the frozen NF4 base is sharded: half the codes and half the scales on each rank
        (codes, all_codes, codes_dtype), (scales, all_scales, _) = got["held"]
        assert codes_dtype == torch.uint8 and codes == all_codes // 2 and scales == all_scales // 2
