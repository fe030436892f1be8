"""AdamW8bit: the fused Triton update (interpreted on CPU) against its PyTorch reference, and the optimizer
against the real bitsandbytes.optim.AdamW8bit (CPU) and torch.optim.AdamW."""
import bitsandbytes as bnb
import pytest
import torch

from nanoft.kernels.adamw8bit import adamw8bit_update_
from nanoft.optim import AdamW8bit

pytestmark = pytest.mark.usefixtures("one_thread")  # many steps on tiny tensors (tests/conftest.py)


HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _states(n: int) -> list[torch.Tensor]:
    blocks = -(-n // 256)
    return [torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(blocks)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_kernel_matches_reference(dtype, weight_decay):
    torch.manual_seed(0)
    n = 256 * 4 + 37  # a short last block
    p0 = torch.randn(n).to(dtype)
    ref, tri = [p0.clone()] + _states(n), [p0.clone()] + _states(n)
    for step in range(1, 5):
        g = (torch.randn(n) * 0.01 * step).to(dtype)
        hp = dict(step=step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay)
        adamw8bit_update_(ref[0], g, *ref[1:], backend="torch", **hp)
        adamw8bit_update_(tri[0], g, *tri[1:], backend="triton", **hp)
        # the states are bit-exact; p can differ in the last bits (of p, or of its step) where torch's
        # vectorised CPU sqrt is not correctly rounded (Triton's sqrt_rn is): steps are ~lr = 1e-2 here
        for a, b in zip(ref[1:], tri[1:]):
            assert torch.equal(a, b)
        torch.testing.assert_close(tri[0].float(), ref[0].float(), rtol=3e-7, atol=1e-8 * step)


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
