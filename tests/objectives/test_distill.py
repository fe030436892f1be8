"""Distillation: the chunked loss against Hinton et al.'s formula written out on whole logits in float64 (values
and gradients), the frozen teacher of another shape loaded from a real checkpoint, and one train.py run."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train  # the repository's script: its main runs here, in this process
from nanoft.config import Config
from nanoft.model.gpt import GPT
from nanoft.objectives.distill import Distillation, distill_loss, load_teacher
from nanoft.run import checkpoint
from nanoft.tools.memory.estimate import Run, static_bytes
from nanoft.tools.memory.shape import ModelShape

ROOT = Path(__file__).resolve().parents[2]


def naive_distill_loss(z_s, z_t, y, T, alpha):
    """alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE, averaged over counted positions."""
    p = torch.softmax(z_t / T, dim=-1)
    kl = (p * (torch.log(p) - torch.log_softmax(z_s / T, dim=-1))).sum(dim=-1)
    counted = y >= 0
    ce = F.cross_entropy(z_s[counted], y[counted], reduction="none")
    return alpha * T * T * kl[counted].mean() + (1 - alpha) * ce.mean()


@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (2.0, 0.9), (4.0, 0.0), (0.5, 1.0)])
def test_chunked_loss_equals_the_formula_on_whole_logits_values_and_gradients(T, alpha):
    g = torch.Generator().manual_seed(0)
    N, V, C_s, C_t = 37, 301, 8, 24  # the student narrower than the teacher
    h_s = torch.randn(N, C_s, dtype=torch.float64, generator=g, requires_grad=True)
    w_s = torch.randn(V, C_s, dtype=torch.float64, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(N, C_t, dtype=torch.float64, generator=g), torch.randn(V, C_t, dtype=torch.float64, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -1  # positions that do not count
    loss, _, ce = distill_loss(h_s, w_s, h_t, w_t, y, T, alpha, chunk_rows=8)  # 5 chunks, the last short
    grads = torch.autograd.grad(loss, (h_s, w_s))
    expected = naive_distill_loss(h_s @ w_s.T, h_t @ w_t.T, y, T, alpha)
    assert loss.dtype == torch.float64 and torch.allclose(loss, expected, rtol=1e-12, atol=0)
    for got, want in zip(grads, torch.autograd.grad(expected, (h_s, w_s))):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    # the parts: alpha = 0 is plain cross-entropy, and KL(p || p) = 0
    assert torch.allclose(ce, F.cross_entropy(h_s @ w_s.T, y, ignore_index=-1), rtol=1e-12)
    assert distill_loss(h_t, w_t, h_t, w_t, y, T, 1.0)[0].abs() < 1e-12


def test_float32_chunks_match_float64(one_thread):
    g = torch.Generator().manual_seed(1)
    h_s, w_s, h_t, w_t = (torch.randn(64, 16, generator=g, dtype=torch.float64) for _ in range(4))
    y = torch.randint(0, 64, (64,), generator=g)
    exact = distill_loss(h_s, w_s, h_t, w_t, y, 2.0, 0.5)[0]
    fp32 = distill_loss(h_s.float(), w_s.float(), h_t.float(), w_t.float(), y, 2.0, 0.5, chunk_rows=7)[0]
    assert fp32.dtype == torch.float32 and fp32.item() == pytest.approx(exact.item(), rel=1e-5)


def save_teacher(path, **shape):
    cfg = Config(n_layer=2, n_head=2, n_embd=32, block_size=32, device="cpu", dtype="float32", **shape)
    torch.manual_seed(0)
    teacher = GPT(cfg)
    with torch.no_grad():
        teacher.wte.weight.mul_(30)  # a confident teacher: a softmax far from the student's near-uniform one
    checkpoint.save(path, checkpoint.Checkpoint(step=1, config=cfg.to_dict(), model=teacher.state_dict()))
    return teacher


def test_teacher_is_frozen_in_eval_mode_and_the_student_learns_from_it(tmp_path, one_thread):
    teacher = save_teacher(tmp_path / "teacher")
    cfg = Config(n_layer=1, n_head=2, n_embd=16, block_size=16, device="cpu", dtype="float32", dropout=0.1,
                 finetune="distill", teacher_from=str(tmp_path / "teacher"), distill_alpha=1.0, distill_temperature=1.0)
    student = GPT(cfg)
    objective = Distillation(cfg, student, "cpu")
    loaded = objective.teacher
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.cfg.n_embd == 32 and loaded.block_size == 16  # its own width, the student's context
    assert torch.equal(loaded.wte.weight, teacher.wte.weight)
    x = torch.randint(0, 1000, (4, 16))
    y = torch.randint(0, 1000, (4, 16))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = objective(student, (x, y))
        loss.backward()
        assert all(p.grad is None for p in loaded.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # alpha = 1: only the teacher's softmax teaches
    assert set(objective.pop_scores("train_")) == {"train_kl", "train_ce"}
    student.eval()  # as train.py evaluates: no dropout
    with torch.no_grad():
        assert torch.equal(objective.eval_loss(student, (x, y)), student(x, y))  # val: the student's own CE


def test_teacher_errors_are_one_line(tmp_path):
    save_teacher(tmp_path / "small_vocab", vocab_size=1024)
    with pytest.raises(ValueError, match="vocab_size=1024"):
        load_teacher(Config(finetune="distill", teacher_from=str(tmp_path / "small_vocab"), block_size=16), "cpu")
    save_teacher(tmp_path / "teacher")
    with pytest.raises(ValueError, match="block_size=32 < the student's 64"):
        load_teacher(Config(finetune="distill", teacher_from=str(tmp_path / "teacher"), block_size=64), "cpu")


def test_train_distill_logs_both_parts_and_the_student_samples(tmp_path, capsys, monkeypatch):
    save_teacher(tmp_path / "teacher")
    monkeypatch.chdir(ROOT)
    train.main(["configs/distill.py", f"--out_dir={tmp_path / 'student'}", f"--teacher_from={tmp_path / 'teacher'}",
                "--n_layer=1", "--n_embd=16", "--block_size=32", "--batch_size=2", "--max_iters=2", "--eval_interval=2",
                "--eval_iters=1", "--log_interval=1", "--warmup_iters=0", "--dtype=float32"])
    record = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_kl", "train_ce", "val_loss"} <= set(record) and "sample:" in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "student").config["n_embd"] == 16


def test_memory_estimate_counts_the_teacher_in_its_own_shape(tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    cfg = Config(n_layer=1, n_head=2, n_embd=16, block_size=16, finetune="distill", teacher_from=str(tmp_path / "teacher"))
    est = static_bytes(ModelShape.from_config(cfg), Run.from_config(cfg))
    assert est["frozen_model"] == 4 * sum(p.numel() for n, p in teacher.named_parameters() if n != "wpe.weight") + 4 * 16 * 32
