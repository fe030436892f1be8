"""Lion against a float64 transcription of the paper's Algorithm 2 (Chen et al. 2023), and in a real run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoft.config import Config
from nanoft.model import GPT
from nanoft.optim import OPTIMIZERS, make_optimizer
from nanoft.optim.lion import Lion
from nanoft.run import checkpoint

ROOT = Path(__file__).resolve().parents[2]


def paper_lion(theta, grads, lr, beta1, beta2, wd):
    """Algorithm 2, line by line, in float64: c = b1 m + (1 - b1) g; theta -= lr (sign(c) + wd theta);
    m = b2 m + (1 - b2) g."""
    theta, m = theta.double().clone(), torch.zeros_like(theta, dtype=torch.float64)
    for g in grads:
        g = g.double()
        c = beta1 * m + (1 - beta1) * g
        theta = theta - lr * (torch.sign(c) + wd * theta)
        m = beta2 * m + (1 - beta2) * g
    return theta, m


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-15), (torch.float32, 2e-7)])
def test_lion_follows_the_papers_update_step_by_step(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(300, generator=gen, dtype=torch.float64)
    grads = [torch.randn(300, generator=gen, dtype=torch.float64) for _ in range(20)]
    for g in grads[:3]:
        g[:10] = 0  # c = 0 at the first step: sign(0) = 0, the weight only decays
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.99, wd=0.3)
    want_theta, want_m = paper_lion(theta0, [g.to(dtype) for g in grads], **hp)

    p = torch.nn.Parameter(theta0.to(dtype).clone())
    opt = Lion([p], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), weight_decay=hp["wd"])
    for g in grads:
        p.grad = g.to(dtype).clone()
        opt.step()
    # the sign makes every step exactly +-lr, so errors stay at rounding size instead of growing
    assert torch.allclose(p.double(), want_theta, rtol=0, atol=tol * 20)
    assert torch.allclose(opt.state[p]["exp_avg"].double(), want_m, rtol=0, atol=tol * 10)
    assert torch.equal(p.detach()[:10].double() != theta0[:10], torch.ones(10, dtype=torch.bool))  # decayed


def test_lion_moves_every_coordinate_by_exactly_lr_without_weight_decay():
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = Lion([p], lr=0.01, weight_decay=0.0)
    p.grad = torch.randn(1000) * torch.logspace(-6, 3, 1000)  # gradients of every size: the same step
    opt.step()
    assert torch.equal(p.detach().abs(), torch.full((1000,), 0.01))
    assert torch.equal(torch.sign(p.detach()), -torch.sign(p.grad))


def test_lion_is_one_table_entry_that_make_optimizer_and_the_memory_facts_read():
    assert OPTIMIZERS["lion"] is Lion
    cfg = Config(n_layer=1, n_head=2, n_embd=32, block_size=16, optimizer="lion", lr=1e-4, weight_decay=0.5)
    model = GPT(cfg)
    opt = make_optimizer(cfg, model)
    assert isinstance(opt, Lion) and [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model(x, x).backward()
    opt.step()
    held = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    want = sum(Lion.tensor_state_bytes(tuple(p.shape), p.element_size(), cfg) for p in model.parameters())
    assert held == want == 4 * model.num_params()  # one float32 moment: 4 bytes per parameter, AdamW's 8


def test_lion_trains_through_train_py_and_its_state_is_saved(tmp_path):
    out = tmp_path / "lion"
    subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/tiny.py"), "--optimizer=lion",
                    "--lr=1e-3", "--weight_decay=1.0", "--n_layer=1", "--n_embd=64", "--n_head=2", "--batch_size=4",
                    "--block_size=32", "--warmup_iters=2", "--max_iters=12", "--eval_interval=100", "--eval_iters=1",
                    "--log_interval=1", "--compile=False", f"--out_dir={out}"], check=True, capture_output=True, cwd=ROOT)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3  # it learns
    saved = checkpoint.load(out)
    assert {k for slots in saved.optim["state"].values() for k in slots} == {"exp_avg"}
