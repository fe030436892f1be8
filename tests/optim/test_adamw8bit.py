"""AdamW8bit: the fused Triton update (compiled on CUDA, interpreted on the CPU elsewhere) against its PyTorch
reference on the CPU, and the optimizer against the real bitsandbytes.optim.AdamW8bit (CPU) and torch.optim.AdamW
(its small tensors' float32 update is torch's own multi-tensor one: the same bits, fused or not)."""
import bitsandbytes as bnb
import pytest
import torch
from helpers import device_for

import nanoft.optim.adamw8bit as adamw8bit_module
from nanoft.kernels import adamw8bit_cpu
from nanoft.kernels.adamw8bit import adamw8bit_update_
from nanoft.optim import AdamW8bit

pytestmark = pytest.mark.usefixtures("one_thread")  # many steps on tiny tensors (tests/conftest.py's fixture)


HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _states(n: int, device: str = "cpu") -> list[torch.Tensor]:
    blocks = -(-n // 256)
    return [torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(blocks, device=device),
            torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(blocks, device=device)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_kernel_matches_reference(dtype, weight_decay):
    torch.manual_seed(0)
    n = 256 * 4 + 37  # a short last block
    p0 = torch.randn(n).to(dtype)
    dev = device_for("triton")  # the compiled kernel on a GPU, the interpreter on the CPU
    ref, tri = [p0.clone()] + _states(n), [p0.to(dev)] + _states(n, dev)
    for step in range(1, 5):
        g = (torch.randn(n) * 0.01 * step).to(dtype)
        hp = dict(step=step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay)
        adamw8bit_update_(ref[0], g, *ref[1:], backend="torch", **hp)
        adamw8bit_update_(tri[0], g.to(dev), *tri[1:], backend="triton", **hp)
        # the states are bit-exact; p can differ in the last bits (of p, or of its step) where torch's
        # vectorised CPU sqrt is not correctly rounded (Triton's sqrt_rn is): steps are ~lr = 1e-2 here
        for a, b in zip(ref[1:], tri[1:]):
            assert torch.equal(a, b.cpu())
        torch.testing.assert_close(tri[0].float().cpu(), ref[0].float(), rtol=3e-7, atol=1e-8 * step)


def test_optimizer_with_triton_matches_the_reference_optimizer():
    """AdamW8bit(backend="triton") on device_for("triton") against AdamW8bit(backend="torch") on the CPU, given
    the same gradients: 8-bit states bit-exact at every step (they depend on the gradients, not on p), p within
    the kernel test's tolerance, the small tensors' float32 path exact up to fused-vs-foreach rounding."""
    torch.manual_seed(0)
    dev = device_for("triton")
    shapes = [(40, 130), (300,), (256 * 3,)]  # a short last block; a small tensor; exactly three blocks
    init = [torch.randn(s) * 0.02 for s in shapes]
    ref = [torch.nn.Parameter(w.clone()) for w in init]
    tri = [torch.nn.Parameter(w.to(dev)) for w in init]
    ref_opt = AdamW8bit(ref, **HP, min_8bit_size=512, backend="torch")
    tri_opt = AdamW8bit(tri, **HP, min_8bit_size=512, backend="triton")
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        for a, b in zip(ref, tri):
            a.grad = torch.randn(a.shape, generator=gen) * 0.01 * step
            b.grad = a.grad.to(dev)
        ref_opt.step()
        tri_opt.step()
        for a, b in zip(ref, tri):
            for name, t in ref_opt.state[a].items():
                if name.endswith(("codes", "absmax")):
                    assert torch.equal(t, tri_opt.state[b][name].cpu()), (step, name)
            torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=3e-7, atol=1e-8 * step)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_cpu_loop_matches_reference_bit_for_bit(weight_decay):
    """backend="auto" on the CPU runs adamw8bit_cpu.py's C loop (split over threads) for float32: parameter and
    states bit-identical to the reference at every step, including a short last block and all-zero gradients."""
    assert adamw8bit_cpu.load() is not None, "the C compiler is part of the test environment"
    torch.manual_seed(0)
    n = 256 * 300 + 37  # 301 blocks: several threads' shares, the last block short
    p0 = torch.randn(n) * 0.02
    ref, loop = [p0.clone()] + _states(n), [p0.clone()] + _states(n)
    torch.set_num_threads(3)  # three shares of the blocks (the one_thread fixture restores the count)
    for step in range(1, 6):
        g = torch.randn(n) * 0.01 * step
        if step == 1:
            g[: 256 * 2] = 0  # whole zero blocks: zero absmax
        hp = dict(step=step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay)
        adamw8bit_update_(ref[0], g, *ref[1:], backend="torch", **hp)
        adamw8bit_update_(loop[0], g, *loop[1:], backend="auto", **hp)
        for a, b in zip(ref, loop):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), step


def test_cpu_loop_builds_in_a_fresh_cache_and_without_a_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOFT_CACHE", str(tmp_path))
    monkeypatch.setattr(adamw8bit_cpu, "_LIB", [])
    assert adamw8bit_cpu.load() is not None and len(list(tmp_path.glob("adamw8bit_cpu-*.so"))) == 1
    monkeypatch.setattr(adamw8bit_cpu, "_LIB", [])
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="could not be built"):
        assert adamw8bit_cpu.load() is None
    p, g = torch.randn(1000), torch.randn(1000) * 0.01
    hp = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    ref = [p.clone()] + _states(1000)
    adamw8bit_update_(p, g, *_states(1000), backend="auto", **hp)  # the reference, still correct
    adamw8bit_update_(ref[0], g, *ref[1:], backend="torch", **hp)
    assert torch.equal(p, ref[0])


def test_reference_update_in_chunks_gives_the_bits_of_one_call(monkeypatch):
    """The optimizer runs the reference on REFERENCE_CHUNK elements at a time: the same bits as one call."""
    monkeypatch.setattr(adamw8bit_module, "REFERENCE_CHUNK", 512)
    torch.manual_seed(0)
    w = torch.randn(5 * 512 + 300) * 0.02  # the last chunk short, its last block short
    p = torch.nn.Parameter(w.clone())
    opt = AdamW8bit([p], **HP, min_8bit_size=1, backend="torch")
    whole = [w.clone()] + _states(w.numel())
    for step in range(1, 4):
        p.grad = torch.randn_like(w) * 0.01
        opt.step()
        adamw8bit_update_(whole[0], p.grad, *whole[1:], backend="torch", step=step, lr=HP["lr"],
                          beta1=HP["betas"][0], beta2=HP["betas"][1], eps=HP["eps"], weight_decay=HP["weight_decay"])
    assert torch.equal(p.detach(), whole[0])
    names = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
    for name, t in zip(names, whole[1:]):
        assert torch.equal(opt.state[p][name], t)


def _small_params(device: str) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    shapes = [(128,), (4095,), (7,), (64, 63), (3, 5), (1,)]  # every one below min_8bit_size: float32 states
    return [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]


@pytest.mark.parametrize("device", ["cpu"] + CUDA)
@pytest.mark.parametrize("fused", [None, False, True])
def test_float32_states_are_torch_adamw_bit_for_bit(device, fused):
    """The small tensors' update is torch.optim.AdamW's for the same `fused` setting. None: ours picks fused
    on CUDA, foreach elsewhere; torch's default is foreach on CUDA and the single-tensor loop on the CPU --
    so on CUDA the default is compared with fused=True, on the CPU with torch's own default."""
    ours, theirs = _small_params(device), _small_params(device)
    hp = dict(HP, lr=3e-2)
    opt = AdamW8bit(ours, **hp, fused=fused)
    torch_fused = True if (fused is None and device == "cuda") else fused
    ref = torch.optim.AdamW(theirs, **hp, fused=torch_fused)
    gen = torch.Generator().manual_seed(1)
    for i in range(20):
        for a, b in zip(ours, theirs):
            a.grad = (torch.randn(a.shape, generator=gen) * 0.01 * (1 + i % 3)).to(device)
            b.grad = a.grad.clone()
        for group in opt.param_groups + ref.param_groups:
            group["lr"] = 3e-2 * (1 - i / 40)  # the loop's schedule changes lr every step
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], ref.state[b]["exp_avg"])
        assert torch.equal(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])
        assert opt.state[a]["step"] == 20


def test_fused_kernel_validates_inputs():
    p, g = torch.zeros(300), torch.zeros(300)
    hp = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="absmax"):
        adamw8bit_update_(p, g, torch.zeros(300, dtype=torch.uint8), torch.zeros(1),
                          torch.zeros(300, dtype=torch.uint8), torch.zeros(2), **hp)
    with pytest.raises(ValueError, match="uint8"):
        adamw8bit_update_(p, g, torch.zeros(300), torch.zeros(2), torch.zeros(300, dtype=torch.uint8),
                          torch.zeros(2), **hp)
    with pytest.raises(ValueError, match="backend"):
        adamw8bit_update_(p, g, *_states(300), backend="cuda", **hp)


def test_torch_adds_are_fused_multiply_adds():
    """The kernel's two tl.fma stand for torch's CPU add_(alpha=) and addcmul_: check that premise here."""
    torch.manual_seed(0)
    a, b = torch.randn(4096), torch.randn(4096)

    def fma(x, y, z):  # float32 fma via float64: the product is exact, one rounding at the end (almost always)
        return (x.double() * y.double() + z.double()).float()

    assert torch.equal(a.clone().add_(b, alpha=0.1), fma(b, torch.tensor(0.1), a))
    assert torch.equal(a.abs().addcmul_(b, b, value=0.05), fma(torch.tensor(0.05) * b, b, a.abs()))


def test_one_step_states_match_bitsandbytes_exactly():
    torch.manual_seed(0)
    w = torch.randn(96, 130) * 0.02  # 12480 elements: 49 blocks, the last one short
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = AdamW8bit([ours], **HP)
    ref = bnb.optim.AdamW8bit([theirs], **HP)
    g = torch.randn_like(w) * 0.01
    ours.grad, theirs.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    s, r = opt.state[ours], ref.state[theirs]
    assert torch.equal(s["exp_avg_codes"], r["state1"])
    assert torch.equal(s["exp_avg_sq_codes"], r["state2"])
    assert torch.equal(s["exp_avg_absmax"], r["absmax1"])
    assert torch.equal(s["exp_avg_sq_absmax"], r["absmax2"])
    assert torch.equal(ours, theirs)


def test_many_steps_match_bitsandbytes_exactly_given_the_same_gradients():
    torch.manual_seed(1)
    w = torch.randn(64, 80) * 0.02
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt, ref = AdamW8bit([ours], **HP), bnb.optim.AdamW8bit([theirs], **HP)
    for i in range(100):
        g = torch.randn_like(w) * 0.01 * (1 + i % 5)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    s, r = opt.state[ours], ref.state[theirs]
    assert torch.equal(ours, theirs)
    assert torch.equal(s["exp_avg_codes"], r["state1"]) and torch.equal(s["exp_avg_sq_codes"], r["state2"])


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # two 4096-element weights (8-bit states), biases and a LayerNorm (32-bit states)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.LayerNorm(128),
                               torch.nn.Linear(128, 32))


def test_trajectory_stays_close_to_bitsandbytes_and_adamw():
    """300 steps of regression on a 2-layer MLP: parameters relative to the distance travelled from init."""
    models = {name: _small_model() for name in ("ours", "bnb", "adamw")}
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opts = {"ours": AdamW8bit(models["ours"].parameters(), **hp),
            "bnb": bnb.optim.AdamW8bit(models["bnb"].parameters(), **hp),
            "adamw": torch.optim.AdamW(models["adamw"].parameters(), **hp)}
    init = torch.cat([p.detach().flatten() for p in _small_model().parameters()])
    target = torch.nn.Linear(32, 32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = torch.randn(16, 32, generator=gen)
        y = target(x).detach()
        for name, model in models.items():
            opts[name].zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opts[name].step()
    flat = {name: torch.cat([p.detach().flatten() for p in m.parameters()]) for name, m in models.items()}
    travelled = (flat["adamw"] - init).norm()
    assert (flat["ours"] - flat["bnb"]).norm() / travelled < 0.05
    assert (flat["ours"] - flat["adamw"]).norm() / travelled < 0.1


def test_small_tensors_keep_32bit_states_and_memory_is_about_2_bytes_per_param():
    big, small = torch.nn.Parameter(torch.zeros(256, 64)), torch.nn.Parameter(torch.zeros(4095))
    opt = AdamW8bit([big, small], min_8bit_size=4096)
    big.grad, small.grad = torch.ones_like(big), torch.ones_like(small)
    opt.step()
    assert opt.state[big]["exp_avg_codes"].dtype == torch.uint8
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    big_bytes = sum(t.numel() * t.element_size() for t in opt.state[big].values() if isinstance(t, torch.Tensor))
    assert big_bytes / big.numel() == pytest.approx(2 + 8 / 256)


def test_bad_arguments_raise():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for kwargs in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-0.1),
                   dict(backend="gpu")):
        with pytest.raises(ValueError):
            AdamW8bit(p, **kwargs)
