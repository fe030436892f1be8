"""LoRA and QLoRA: identity at init, merge/unmerge, frozen base, adapter files, the merge command,
NF4 bases, and gradient checkpointing. Small real models (2 layers, width 64), no mocks."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoft.config import LORA_TARGETS, Config, load_config
from nanoft.model.gpt import GPT
from nanoft.peft.lora import LoRALinear
from nanoft.peft.lora_model import (
    adapter_config,
    adapter_state_dict,
    apply_lora,
    count_params,
    load_adapter_state_dict,
    lora_modules,
    merge_lora,
    trainable_summary,
)
from nanoft.quant import Linear4bit
from nanoft.run import checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = Config(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=256, dropout=0.0, lora_dropout=0.0,
               device="cpu", finetune="lora")


def small_model(seed: int = 0, **overrides) -> tuple[GPT, Config]:
    cfg = dataclasses.replace(SMALL, **overrides)
    torch.manual_seed(seed)
    return GPT(cfg), cfg


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero, which would make every merge test trivially pass: give it values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def tokens(seed: int = 0, B: int = 3, T: int = 16) -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)  # logits at every position


def test_lora_linear_equals_base_at_init_even_with_dropout():
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    lora = LoRALinear(base, r=4, alpha=8, dropout=0.5)  # train mode: dropout active on the LoRA path
    x = torch.randn(5, 7, 32)
    assert torch.equal(lora(x), base(x))
    assert torch.all(lora.lora_B == 0) and lora.lora_A.abs().sum() > 0  # the named init steps
    assert lora.scaling == 2.0 and lora.adapter_params() == ["lora_A", "lora_B"]
    assert not base.weight.requires_grad and lora.lora_A.requires_grad


def test_lora_linear_maths():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    lora = LoRALinear(base, r=2, alpha=6, dropout=0.0)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(4, 16)
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ lora.lora_A.T @ lora.lora_B.T)  # alpha/r = 3
    torch.testing.assert_close(lora(x), expected)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), LORA_TARGETS])
def test_gpt_output_equals_base_at_init(targets):
    model, cfg = small_model(lora_targets=targets, lora_dropout=0.1)
    x = tokens()
    before = logits(model, x)
    apply_lora(model, cfg)
    assert len(lora_modules(model)) == cfg.n_layer * len(targets)
    assert torch.equal(logits(model, x), before)


def test_full_and_none_leave_the_model_alone():
    for finetune in ("full", "none"):
        model, cfg = small_model(finetune=finetune)
        assert apply_lora(model, cfg) is model
        assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_apply_twice_is_an_error():
    model, cfg = small_model()
    apply_lora(model, cfg)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, cfg)


def test_merge_equals_unmerged_and_unmerge_restores():
    model, cfg = small_model(lora_targets=LORA_TARGETS)
    apply_lora(model, cfg)
    randomize_adapters(model)
    x = tokens()
    want = logits(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for m in lora_modules(model).values():
        m.merge()
    torch.testing.assert_close(logits(model, x), want, rtol=1e-5, atol=1e-5)
    for m in lora_modules(model).values():
        m.unmerge()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, x), want, rtol=1e-5, atol=1e-5)


def test_merge_lora_gives_plain_linears_that_load_into_gpt():
    model, cfg = small_model()
    apply_lora(model, cfg)
    randomize_adapters(model)
    x = tokens()
    want = logits(model, x)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    plain = GPT(dataclasses.replace(cfg, finetune="none"))  # no LoRA code: the state dict fits a plain GPT
    checkpoint.load_weights(plain, merged.state_dict(), "merged")
    torch.testing.assert_close(logits(plain, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_norms", [False, True])
def test_only_adapters_receive_gradients(train_norms):
    model, cfg = small_model(lora_targets=("q_proj", "v_proj", "fc_out"), lora_dropout=0.1, lora_train_norms=train_norms)
    apply_lora(model, cfg)
    randomize_adapters(model)  # with B = 0 the gradient of A would be zero: not a real test
    x = tokens()
    model(x, x).backward()
    for name, p in model.named_parameters():
        is_norm = ".ln_" in name or name.startswith("ln_f.")
        trains = name.endswith((".lora_A", ".lora_B")) or (train_norms and is_norm)
        assert p.requires_grad == trains, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) if trains else p.grad is None, name
    norms = (2 * cfg.n_layer + 1) * 2 * cfg.n_embd  # ln_1, ln_2 of each block and ln_f: gain and bias
    C = cfg.n_embd  # q and v: A (r, C) and B (C, r); fc_out: A (r, 4C) and B (C, r)
    adapters = cfg.n_layer * cfg.lora_r * (2 * (C + C) + (4 * C + C))
    assert count_params(model)[0] == adapters + (norms if train_norms else 0)


def test_trained_norms_lift_the_frozen_heads_confidence_cap():
    """Why lora_train_norms exists: with ln_f frozen its output has a fixed size, so the tied head's logits
    have a bounded range and no adapter can make a token more likely than that range allows. Here every
    adapter is trained hard toward one token; only with the norms trainable does its probability get near 1."""
    final = {}
    for train_norms in (False, True):
        model, cfg = small_model(lora_train_norms=train_norms, lora_targets=LORA_TARGETS)
        apply_lora(model, cfg)  # a freshly initialised head: small logits, as an undertrained base has
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        x = tokens(B=4, T=8)
        y = torch.full_like(x, 7)
        for _ in range(100):
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        final[train_norms] = loss.item()
    assert final[False] > 4.0  # flat at 4.24 from step 50 on: the cap, not a lack of steps (log 256 = 5.5)
    assert final[True] < 0.2


def test_trainable_fraction_of_100m_r8_qv(capsys):
    cfg = dataclasses.replace(load_config(str(ROOT / "configs/100m.py"), []), finetune="lora", lora_r=8,
                              lora_targets=("q_proj", "v_proj"))
    with torch.device("meta"):  # the shapes are all we need: no 400 MB of weights
        model = GPT(cfg)
        n_base = model.num_params()  # the tied head counted once
        apply_lora(model, cfg)
    trainable, total = count_params(model)
    assert trainable == cfg.n_layer * 2 * cfg.lora_r * (cfg.n_embd + cfg.n_embd)  # q and v: A (r, C) + B (C, r)
    assert total == n_base + trainable
    summary = trainable_summary(model)
    with capsys.disabled():
        print(f"\nconfigs/100m.py, LoRA r=8 on q_proj, v_proj: {summary}")
    assert summary.startswith(f"trainable params: {trainable:,} of {total:,} (")


def test_adapter_round_trip_through_safetensors(tmp_path):
    model, cfg = small_model(lora_targets=("k_proj", "fc_in"))
    apply_lora(model, cfg)
    randomize_adapters(model)
    sd = adapter_state_dict(model)
    assert set(sd) == {f"blocks.{i}.{p}.lora_{ab}" for i in range(2) for p in ("attn.k_proj", "mlp.fc_in") for ab in "AB"}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "adapter.safetensors")

    fresh, _ = small_model()  # same base seed, new random A and zero B
    apply_lora(fresh, cfg)
    load_adapter_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    x = tokens()
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert adapter_config(cfg)["targets"] == ["k_proj", "fc_in"] and adapter_config(cfg)["r"] == cfg.lora_r


def test_adapter_with_trained_norms_round_trips_and_merges(tmp_path):
    model, cfg = small_model(lora_train_norms=True)
    apply_lora(model, cfg)
    randomize_adapters(model)
    with torch.no_grad():
        model.ln_f.weight.mul_(3.0)  # a trained norm, different from the base's
        model.blocks[1].ln_2.bias.add_(0.5)
    sd = adapter_state_dict(model)
    assert {"ln_f.weight", "ln_f.bias", "blocks.0.ln_1.weight", "blocks.1.ln_2.bias"} <= set(sd)
    assert len(sd) == 2 * 2 * 2 + (2 * 2 + 1) * 2  # A and B of q, v in 2 blocks; 5 norms' gain and bias
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "adapter.safetensors")
    fresh, _ = small_model()
    apply_lora(fresh, cfg)
    load_adapter_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
    x = tokens()
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert adapter_config(cfg)["train_norms"] is True
    merged = merge_lora(fresh)  # the trained norms stay in the merged model
    plain, _ = small_model(finetune="none")
    plain.load_state_dict(merged.state_dict())
    torch.testing.assert_close(logits(plain, x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_load_adapter_is_strict():
    model, cfg = small_model()
    apply_lora(model, cfg)
    sd = adapter_state_dict(model)
    key = "blocks.0.attn.q_proj.lora_A"
    with pytest.raises(ValueError, match="missing.*" + key):
        load_adapter_state_dict(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="unexpected.*blocks.0.mlp.fc_in.lora_A"):
        load_adapter_state_dict(model, {**sd, "blocks.0.mlp.fc_in.lora_A": sd[key]})
    with pytest.raises(ValueError, match=f"{key} has shape \\(4, 64\\)"):
        load_adapter_state_dict(model, {**sd, key: torch.zeros(4, 64)})


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(finetune):
    grads = []
    for ckpt in (False, True):
        model, cfg = small_model(finetune=finetune, gradient_checkpointing=ckpt, dropout=0.0)
        apply_lora(model, cfg)
        randomize_adapters(model)
        model.train()
        x = tokens()
        model(x, x).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_merge_command_writes_a_plain_checkpoint(tmp_path):
    """What a user does: a base checkpoint, a LoRA run's adapter checkpoint (saved as train.py saves it),
    `python -m nanoft merge`, then the merged checkpoint loads into a plain GPT."""
    base, cfg = small_model(finetune="none")
    checkpoint.save(tmp_path / "base", checkpoint.Checkpoint(step=10, config=cfg.to_dict(), model=base.state_dict()))
    lora_cfg = dataclasses.replace(cfg, finetune="lora", init_from=str(tmp_path / "base"), out_dir=str(tmp_path / "run"))
    model = apply_lora(base, lora_cfg)
    randomize_adapters(model)
    checkpoint.save(tmp_path / "run", checkpoint.Checkpoint(step=5, config=lora_cfg.to_dict(), model=adapter_state_dict(model),
                                                            base_from=lora_cfg.init_from))
    out = subprocess.run([sys.executable, "-m", "nanoft", "merge", "--adapter", str(tmp_path / "run"),
                          "--out", str(tmp_path / "merged")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ck = checkpoint.load(tmp_path / "merged")
    assert ck.config["finetune"] == "none"
    plain = GPT(Config.from_dict(ck.config))
    checkpoint.load_weights(plain, ck.model, "merged")
    x = tokens()
    torch.testing.assert_close(logits(plain, x), logits(model, x), rtol=1e-5, atol=1e-5)

    bad = subprocess.run([sys.executable, "-m", "nanoft", "merge", "--adapter", str(tmp_path / "base"),
                          "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "not a LoRA adapter" in bad.stderr


# --- QLoRA: LoRA over the NF4 Linear4bit -------------------------------------------------------------

def test_qlora_forward_matches_float_linear_with_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    q = Linear4bit.from_linear(linear, blocksize=64, double_quant=True, compute_dtype=torch.float32)
    lora = LoRALinear(q, r=4, alpha=8, dropout=0.0)
    nn.init.normal_(lora.lora_B, std=0.1)
    reference = nn.Linear(128, 64)
    with torch.no_grad():
        reference.weight.copy_(q.dequantize() + lora.delta_weight())
        reference.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(lora(x), reference(x), rtol=1e-5, atol=1e-5)
    # NF4 is close, not exact: at most half the code's widest gap (-1.0 to -0.696) times the block's absmax,
    # plus a little for the 8-bit double-quantized absmax
    assert 0 < (q.dequantize() - linear.weight).abs().max() <= 0.16 * linear.weight.abs().max()
    lora.merge()  # NF4 base: dequantize + add into a float linear
    assert isinstance(lora.base, nn.Linear)
    torch.testing.assert_close(lora(x), reference(x), rtol=1e-5, atol=1e-5)
    lora.unmerge()
    assert lora.base is q


def test_qlora_model_quantizes_every_block_linear_and_trains_only_adapters():
    model, cfg = small_model(finetune="qlora", nf4_blocksize=64, double_quant=True)
    apply_lora(model, cfg)
    randomize_adapters(model)
    for block in model.blocks:
        for name in ("attn.q_proj", "attn.v_proj"):
            assert isinstance(block.get_submodule(name).base, Linear4bit)
        for name in ("attn.k_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"):
            assert isinstance(block.get_submodule(name), Linear4bit)
    assert model.wte.weight.dtype == torch.float32 and not model.wte.weight.requires_grad
    x = tokens()
    want = logits(model, x)
    model(x, x).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) and all(model.get_parameter(n).grad is not None for n in trainable)
    assert "trainable params" in trainable_summary(model)
    merged = merge_lora(model)  # dequantized base + update, NF4 non-targets dequantized too
    assert not any(isinstance(m, (LoRALinear, Linear4bit)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_frozen_base_in_the_compute_dtype_trained_tensors_in_float32(finetune):
    """As on CUDA (compute dtype bf16): everything frozen is stored in bf16, half the bytes, while the adapters
    and the trained norms keep float32 master weights; under bf16 autocast a layer returns bf16 and the
    model trains (the adapters' float32 gradients flow)."""
    model, cfg = small_model(finetune=finetune, lora_train_norms=True, lora_targets=LORA_TARGETS)
    apply_lora(model, cfg, device="cpu", dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        want = torch.float32 if p.requires_grad else torch.bfloat16
        assert p.dtype == want, (name, p.dtype)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or ".ln_" in n or n.startswith("ln_f") for n in trained)
    x = tokens()
    with torch.autocast("cpu", torch.bfloat16):
        layer = model.blocks[0].attn.q_proj
        assert layer(torch.randn(2, 3, 64)).dtype == torch.bfloat16  # no cast back to the input's float32
        loss = model(x, x)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
