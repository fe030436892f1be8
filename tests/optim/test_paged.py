"""Paged AdamW: host-resident states, updated page by page, with the results of the non-paged optimizers.
The tests marked cuda_only are the ones that exercise the streams, events and pinned arena."""
import os

import pytest
import torch

from nanoft.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

pytestmark = pytest.mark.usefixtures("one_thread")  # many steps on tiny tensors (tests/conftest.py's fixture)


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
@pytest.mark.parametrize("min_paged_size", [1, 4096])  # every state paged; or the small ones kept beside them
def test_paged_adamw_equals_torch_adamw_exactly(page_size, min_paged_size):
    ref, ours = _model(), _model()
    _train(ref, torch.optim.AdamW(ref.parameters(), **HP))
    _train(ours, PagedAdamW(ours.parameters(), **HP, page_size=page_size, min_paged_size=min_paged_size))
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("page_size", [256, 768])
@pytest.mark.parametrize("min_paged_size", [1, 4096])
def test_paged_adamw8bit_equals_adamw8bit_exactly(page_size, min_paged_size):
    ref, ours = _model(), _model()
    ref_opt = AdamW8bit(ref.parameters(), **HP, min_8bit_size=2000)
    opt = PagedAdamW8bit(ours.parameters(), **HP, min_8bit_size=2000, page_size=page_size,
                         min_paged_size=min_paged_size)
    _train(ref, ref_opt)
    _train(ours, opt)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ref.parameters(), ours.parameters()):
        for name, t in ref_opt.state[a].items():
            assert torch.equal(t, opt.state[b][name]) if isinstance(t, torch.Tensor) else t == opt.state[b][name]
    assert opt.state[ours[0].weight]["exp_avg_codes"].dtype == torch.uint8


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_paged_states_are_one_host_arena_of_exactly_their_size(cls):
    """Every paged state is a view of one host buffer holding exactly their bytes (no padding, no rounding to
    a power of two); tensors below min_paged_size keep their own states beside them."""
    model = _model()
    kwargs = dict(min_8bit_size=2000) if cls is PagedAdamW8bit else {}
    opt = cls(model.parameters(), page_size=256, **kwargs)  # min_paged_size 4096: only the 7000-element weight
    _train(model, opt, steps=1)
    paged = [p for p in model.parameters() if opt.is_paged(p)]
    assert paged == [model[0].weight]
    tensors = [t for p in paged for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    arena = tensors[0].untyped_storage()
    assert all(t.untyped_storage().data_ptr() == arena.data_ptr() for t in tensors)
    assert arena.nbytes() == sum(t.numel() * t.element_size() for t in tensors)
    for p in model.parameters():
        if not opt.is_paged(p):
            for t in opt.state[p].values():
                if isinstance(t, torch.Tensor):
                    assert t.device == p.device and t.untyped_storage().data_ptr() != arena.data_ptr()


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_cpu_paging_copies_nothing(cls):
    """On the CPU the host is the device: a step updates the pages where they live, with no copy or clone of any
    tensor (every aten op of the step is recorded below the Python layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = _model()
    opt = cls(model.parameters(), **HP, page_size=768, min_paged_size=1)
    _train(model, opt, steps=1)  # the states exist
    model(torch.randn(8, 100)).pow(2).mean().backward()
    ops = []
    with Record():
        opt.step()
    assert ops and not {"copy_", "_to_copy", "clone", "contiguous"} & set(ops), sorted(set(ops))


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


# --- CUDA: pinned host arena, three streams; run by the lead on a GPU -----------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host states, copy streams")


def _step_with_random_grads(params, opt, steps: int, seed: int = 0) -> None:
    """Gradients drawn on the CPU from a seeded generator: the same bits for every optimizer compared (a GPU
    backward pass need not be deterministic, and bit-exactness is about the optimizer)."""
    gen = torch.Generator().manual_seed(seed)
    params = list(params)
    for i in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2 * (1 + i % 3)).to(p.device)
        opt.step()


def _warm_8bit_caches() -> None:
    """AdamW8bit keeps its code maps and lookup tables on the device for good: make them before measuring."""
    p = torch.nn.Parameter(torch.zeros(4096, device="cuda"))
    p.grad = torch.ones_like(p)
    AdamW8bit([p]).step()
    torch.cuda.synchronize()


def _reference(cls, params):
    """What a paged optimizer must equal bit for bit: torch's fused AdamW (32-bit) or AdamW8bit (8-bit)."""
    if cls is PagedAdamW:
        return torch.optim.AdamW(params, **HP, fused=True), {}
    return AdamW8bit(params, **HP, min_8bit_size=2000), dict(min_8bit_size=2000)


@cuda_only
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
@pytest.mark.parametrize("min_paged_size", [1, 4096])
def test_cuda_paging_equals_unpaged_bit_for_bit(cls, min_paged_size):
    """Many pages (7000 / 512: 14, plus the rest) cycle through the three device buffers for 15 steps."""
    ref, ours = _model("cuda"), _model("cuda")
    ref_opt, kwargs = _reference(cls, ref.parameters())
    opt = cls(ours.parameters(), **HP, page_size=512, min_paged_size=min_paged_size, **kwargs)
    _step_with_random_grads(ref.parameters(), ref_opt, steps=15)
    _step_with_random_grads(ours.parameters(), opt, steps=15)
    opt.synchronize()
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)
        for name, t in ref_opt.state[a].items():
            if isinstance(t, torch.Tensor) and name != "step":
                assert torch.equal(t.cpu(), opt.state[b][name].cpu()), name
    for p in ours.parameters():
        for t in opt.state[p].values():
            if isinstance(t, torch.Tensor):
                if opt.is_paged(p):
                    assert t.device.type == "cpu" and t.is_pinned()
                else:
                    assert t.device == p.device


@cuda_only
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_cuda_paging_holds_no_device_memory_between_steps(cls):
    """Between steps only the small tensors' states stay on the GPU; during a step at most the three page
    buffers (twice, while the last step's are still being written back) come on top."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256)).cuda()  # 65536: 64 pages
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2  # fixed gradients: nothing but the optimizer allocates
    kwargs = dict(min_8bit_size=2000) if cls is PagedAdamW8bit else {}
    opt = cls(model.parameters(), **HP, page_size=1024, **kwargs)
    _warm_8bit_caches()
    base = torch.cuda.memory_allocated()
    page_buffers = 3 * (2 * 1024 * 4 if cls is PagedAdamW else 2 * 1024 + 2 * 256)  # SLOTS x aligned slot
    for _ in range(4):
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        opt.synchronize()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # lets the allocator retire the buffers it was told (record_stream) to wait for
        resident = sum(t.numel() * t.element_size() for p in model.parameters() if not opt.is_paged(p)
                       for t in opt.state[p].values() if isinstance(t, torch.Tensor))
        held = torch.cuda.memory_allocated() - base
        assert resident <= held <= resident + 4 * 512, (held, resident)  # blocks are rounded to 512 bytes
        assert torch.cuda.max_memory_allocated() - base <= held + 2 * page_buffers + 8 * 512


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@cuda_only
def test_cuda_host_memory_is_the_states_size():
    """The arena is pinned in place: host memory grows by the states' bytes, not by the next power of two (as
    pin_memory() through torch's caching host allocator would), and that allocator is not used at all."""
    warm = torch.nn.Parameter(torch.randn(8192, device="cuda"))
    warm.grad = torch.randn_like(warm)
    PagedAdamW([warm], page_size=1024).step()  # CUDA context, streams, kernels: their host memory comes first
    torch.cuda.synchronize()
    # 8 bytes per element: 36 MB of states, a power of two would take 64 MB. Above glibc's largest mmap
    # threshold (32 MB), so the arena is fresh pages that RSS counts, not recycled heap.
    n = (1 << 22) + (1 << 18)
    p = torch.nn.Parameter(torch.zeros(n, device="cuda"))
    p.grad = torch.full_like(p, 1e-3)
    host_allocator = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    rss = _rss_bytes()
    opt = PagedAdamW([p], **HP)
    opt.step()
    opt.synchronize()
    grown = _rss_bytes() - rss
    states = 8 * n
    assert opt.state[p]["exp_avg"].untyped_storage().nbytes() == states
    assert opt.state[p]["exp_avg"].is_pinned() and opt.state[p]["exp_avg_sq"].is_pinned()
    assert states * 0.9 <= grown <= states * 1.2 + (8 << 20), (grown, states)
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == host_allocator


@cuda_only
def test_cuda_state_dict_waits_for_the_write_backs():
    """state_dict() right after step() (no explicit synchronize) already holds the step's final states."""
    ref, ours = _model("cuda"), _model("cuda")
    ref_opt = AdamW8bit(ref.parameters(), **HP, min_8bit_size=2000)
    opt = PagedAdamW8bit(ours.parameters(), **HP, min_8bit_size=2000, page_size=256, min_paged_size=1)
    for seed in (1, 2):
        _step_with_random_grads(ref.parameters(), ref_opt, steps=2, seed=seed)
        _step_with_random_grads(ours.parameters(), opt, steps=2, seed=seed)
        theirs, mine = ref_opt.state_dict()["state"], opt.state_dict()["state"]
        for idx, slots in theirs.items():
            for name, t in slots.items():
                if isinstance(t, torch.Tensor):
                    assert torch.equal(t.cpu(), mine[idx][name].cpu()), (idx, name)
