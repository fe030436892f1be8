"""Paged AdamW: host-resident states, updated page by page, with the results of the non-paged optimizers."""
import pytest
import torch

from nanoft.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

pytestmark = pytest.mark.usefixtures("one_thread")  # many steps on tiny tensors (tests/conftest.py)


HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _model(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    # 100*70 = 7000 and 70*30 = 2100 elements: pages of 256 or 1000 cut them unevenly
    return torch.nn.Sequential(torch.nn.Linear(100, 70), torch.nn.LayerNorm(70), torch.nn.Linear(70, 30)).to(device)


def _train(model, opt, steps: int = 15, device: str = "cpu") -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 100, generator=gen).to(device)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("page_size", [7, 1000, 1 << 20])
def test_paged_adamw_equals_torch_adamw_exactly(page_size):
    ref, ours = _model(), _model()
    _train(ref, torch.optim.AdamW(ref.parameters(), **HP))
    _train(ours, PagedAdamW(ours.parameters(), **HP, page_size=page_size))
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("page_size", [256, 768])
def test_paged_adamw8bit_equals_adamw8bit_exactly(page_size):
    ref, ours = _model(), _model()
    ref_opt = AdamW8bit(ref.parameters(), **HP, min_8bit_size=2000)
    opt = PagedAdamW8bit(ours.parameters(), **HP, min_8bit_size=2000, page_size=page_size)
    _train(ref, ref_opt)
    _train(ours, opt)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ref.parameters(), ours.parameters()):
        for name, t in ref_opt.state[a].items():
            assert torch.equal(t, opt.state[b][name]) if isinstance(t, torch.Tensor) else t == opt.state[b][name]
    assert opt.state[ours[0].weight]["exp_avg_codes"].dtype == torch.uint8


def test_paged_states_live_on_the_host():
    model = _model()
    opt = PagedAdamW8bit(model.parameters(), min_8bit_size=2000, page_size=256)
    _train(model, opt, steps=1)
    for state in opt.state.values():
        assert all(t.device.type == "cpu" for t in state.values() if isinstance(t, torch.Tensor))


def test_page_size_must_hold_whole_blocks_for_8bit():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="multiple of 256"):
        PagedAdamW8bit(params, page_size=1000)
    with pytest.raises(ValueError):
        PagedAdamW(params, page_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host states, side-stream copies")
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_cuda_paging_matches_and_holds_no_device_memory(cls):
    ref, ours = _model("cuda"), _model("cuda")
    if cls is PagedAdamW:
        ref_opt, kwargs = torch.optim.AdamW(ref.parameters(), **HP), {}
    else:
        ref_opt, kwargs = AdamW8bit(ref.parameters(), **HP, min_8bit_size=2000), dict(min_8bit_size=2000)
    opt = cls(ours.parameters(), **HP, page_size=1024, **kwargs)
    _train(ref, ref_opt, device="cuda")
    _train(ours, opt, device="cuda")
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for state in opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                assert t.device.type == "cpu" and t.is_pinned()
