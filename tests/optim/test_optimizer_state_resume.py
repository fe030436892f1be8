"""Every optimizer's state_dict survives nanoft.run.checkpoint's save and load (safetensors + JSON, what train.py's
resume reads) and training resumes bit-exactly, with 8-bit codes, absmax and host-resident states back in their
dtype and place."""
import dataclasses

import pytest
import torch

from nanoft.config import Config
from nanoft.optim import OPTIMIZERS, PagedAdamW, PagedAdamW8bit, make_optimizer
from nanoft.run import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # many steps on tiny tensors (tests/conftest.py's fixture)


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8)).to(dtype)


def _train(model, opt, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(4, 40, generator=gen).to(next(model.parameters()).dtype)
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 - step / 10)  # the loop's schedule sets lr every step
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


def _round_trip(state_dict: dict, model: torch.nn.Module, path) -> dict:
    """Through nanoft.run.checkpoint itself, as train.py saves and its resume loads: save, then load."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint.save(path, checkpoint.Checkpoint(step=3, config=Config().to_dict(), model=weights, optim=state_dict))
    return checkpoint.load(path).optim


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_exactly(name, dtype, tmp_path):
    cfg = Config(optimizer=name, lr=1e-2, weight_decay=0.1, min_8bit_size=512, page_size=512)
    model = _model(dtype)
    opt = make_optimizer(cfg, model)
    _train(model, opt, steps=3, seed=0)

    resumed = _model(dtype)
    resumed.load_state_dict(model.state_dict())
    resumed_opt = make_optimizer(cfg, resumed)
    resumed_opt.load_state_dict(_round_trip(opt.state_dict(), model, tmp_path))

    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            loaded = resumed_opt.state[q][key]
            if isinstance(value, torch.Tensor):
                assert loaded.dtype == value.dtype and loaded.device == value.device, key
                assert torch.equal(loaded, value), key
            else:
                assert loaded == value and type(loaded) is type(value), key

    _train(model, opt, steps=3, seed=1)
    _train(resumed, resumed_opt, steps=3, seed=1)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_8bit_states_are_really_8bit_after_loading(tmp_path):
    cfg = dataclasses.replace(Config(), optimizer="adamw8bit", min_8bit_size=512)
    model = _model(torch.bfloat16)
    opt = make_optimizer(cfg, model)
    _train(model, opt, steps=1, seed=0)
    resumed = make_optimizer(cfg, model)
    resumed.load_state_dict(_round_trip(opt.state_dict(), model, tmp_path))
    state = resumed.state[model[0].weight]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_absmax"].dtype == torch.float32


def _random_grad_steps(model, opt, steps: int, seed: int) -> None:
    """Seeded gradients drawn on the CPU: the same bits on any device (a GPU backward need not be deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 - step / 10)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.device, p.dtype)
        opt.step()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: pinned host arena"))])
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_paged_arena_states_round_trip_bit_exactly(cls, device, tmp_path):
    """min_paged_size=1 pages every state through the host arena (make_optimizer's default keeps this small
    model's states beside it); they come back as one arena again, pinned on CUDA, and resume bit-exactly."""
    kwargs = dict(lr=1e-2, weight_decay=0.1, page_size=512, min_paged_size=1)
    if cls is PagedAdamW8bit:
        kwargs["min_8bit_size"] = 512
    model = _model().to(device)
    opt = cls(model.parameters(), **kwargs)
    _random_grad_steps(model, opt, steps=3, seed=0)

    resumed = _model().to(device)
    resumed.load_state_dict(model.state_dict())
    resumed_opt = cls(resumed.parameters(), **kwargs)
    resumed_opt.load_state_dict(_round_trip(opt.state_dict(), model, tmp_path))

    arenas = set()
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            loaded = resumed_opt.state[q][key]
            if isinstance(value, torch.Tensor):
                assert loaded.device.type == "cpu" and loaded.dtype == value.dtype and torch.equal(loaded, value)
                assert loaded.is_pinned() == (device == "cuda")
                arenas.add(loaded.untyped_storage().data_ptr())
            else:
                assert loaded == value
    assert len(arenas) == 1

    _random_grad_steps(model, opt, steps=3, seed=1)
    _random_grad_steps(resumed, resumed_opt, steps=3, seed=1)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
