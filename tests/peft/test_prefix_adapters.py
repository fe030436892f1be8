"""Prefix tuning and adapter layers: the prefix attention against a float64 transcription with the widened
mask, the reparameterisation folded into the same logits, adapters starting as their base, only the method's
tensors training, and train.py -> checkpoint -> resume -> sample.py for both. Small real models, no mocks."""
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nanoft.config import Config
from nanoft.data.sft import write_sft_jsonl
from nanoft.interop.pretrained import load_pretrained
from nanoft.model.gpt import GPT, CausalSelfAttention
from nanoft.peft.houlsby import Adapter
from nanoft.peft.methods import PEFT, LoRA
from nanoft.peft.prefix import PrefixEncoder, PrefixTable
from nanoft.run import checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = Config(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256, dropout=0.0, device="cpu", dtype="float32",
               prefix_len=3, prefix_hidden=16, adapter_size=4)


def model_for(finetune: str, seed: int = 0, **overrides) -> tuple[GPT, GPT, Config]:
    """(base, the same base with the method applied, config): two copies of one random GPT."""
    cfg = dataclasses.replace(SMALL, finetune=finetune, **overrides)
    torch.manual_seed(seed)
    base = GPT(cfg)
    adapted = GPT(cfg)
    adapted.load_state_dict(base.state_dict())
    return base, PEFT[cfg.finetune].apply(adapted, cfg), cfg


def tokens(seed: int = 0, B: int = 3, T: int = 12) -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def attention_float64(attn: CausalSelfAttention, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """The paper's attention written out: keys and values [prefix; sequence]; query t may look at every
    prefix position and at sequence positions 0..t; softmax(q Kᵀ / √d) V per head; then the output projection."""
    x, pk, pv = x.double(), pk.double(), pv.double()
    lin = lambda m, h: h @ m.weight.double().T + m.bias.double()
    B, T, C = x.shape
    P, nh = pk.shape[0], attn.n_head
    hs = C // nh
    heads = lambda t: t.view(t.shape[0], -1, nh, hs).transpose(1, 2)  # (B, nh, len, hs)
    q = heads(lin(attn.q_proj, x))
    k = torch.cat((heads(pk.expand(B, P, C)), heads(lin(attn.k_proj, x))), dim=2)
    v = torch.cat((heads(pv.expand(B, P, C)), heads(lin(attn.v_proj, x))), dim=2)
    allowed = torch.tensor([[j < P or j - P <= t for j in range(P + T)] for t in range(T)])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~allowed, float("-inf"))
    y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    return lin(attn.out_proj, y)


def test_prefix_attention_equals_float64_with_the_widened_mask():
    torch.manual_seed(0)
    attn = CausalSelfAttention(SMALL)
    x = torch.randn(2, 7, SMALL.n_embd)
    pk, pv = torch.randn(5, SMALL.n_embd), torch.randn(5, SMALL.n_embd)
    attn.prefix = lambda: (pk, pv)
    got = attn(x)
    torch.testing.assert_close(got.double(), attention_float64(attn, x, pk, pv), rtol=1e-5, atol=1e-5)
    attn.prefix = None  # and the prefix matters: without it the output differs
    assert not torch.allclose(attn(x), got, atol=1e-3)


def test_prefix_keeps_the_model_causal():
    _, model, _ = model_for("prefix")
    x = tokens()
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % SMALL.vocab_size
    a, b = model(x), model(changed)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.equal(a[:, 8:], b[:, 8:])


def test_folded_prefix_gives_the_same_logits_and_saves_only_the_keys_and_values():
    _, model, cfg = model_for("prefix")
    x = tokens()
    trained = model(x)
    weights, train_only = PEFT[cfg.finetune].saved(model)
    L, P, C = cfg.n_layer, cfg.prefix_len, cfg.n_embd
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"prefix.key": (L, P, C), "prefix.value": (L, P, C)}
    assert set(train_only) == {"prefix.embedding", "prefix.hidden.weight", "prefix.hidden.bias",
                               "prefix.out.weight", "prefix.out.bias"}
    base, _, _ = model_for("prefix")  # the same base weights, then the folded table instead of the MLP
    folded = PEFT[cfg.finetune].apply(GPT(cfg), cfg, for_training=False)
    folded.load_state_dict(base.state_dict(), strict=False)
    PEFT[cfg.finetune].load(folded, weights, {})
    assert isinstance(folded.prefix, PrefixTable) and torch.equal(folded(x), trained)


def test_adapters_start_equal_to_the_base_and_then_move():
    base, model, _ = model_for("adapter")
    x = tokens()
    assert torch.equal(model(x), base(x))
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    assert len(adapters) == 2 * SMALL.n_layer and all(torch.all(a.up.weight == 0) for a in adapters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x, x).backward()
    opt.step()
    assert not torch.equal(model(x), base(x))
    assert torch.equal(model.wte.weight, base.wte.weight)  # the base itself did not move


@pytest.mark.parametrize("finetune", ["prefix", "adapter"])
def test_only_the_methods_parameters_train(finetune):
    _, model, _ = model_for(finetune)
    x = tokens()
    model(x, x).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    if finetune == "prefix":  # the MLP and its embedding; every weight of the model frozen
        assert got == {n for n, _ in model.prefix.named_parameters(prefix="prefix")}
    else:  # adapters, and the LayerNorms (Houlsby et al. train them too)
        assert got == {n for n, _ in model.named_parameters() if ".adapter." in n or "ln_" in n}
        assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in got if n.endswith("up.weight"))
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("prefix"))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_prefix_gradients():
    grads = []
    for on in (False, True):
        _, model, _ = model_for("prefix", gradient_checkpointing=on)
        model(tokens(), tokens()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_saved_tensors_are_checked_on_load_and_merging_is_refused_with_the_reason():
    _, model, cfg = model_for("adapter")
    weights, _ = PEFT[cfg.finetune].saved(model)
    _, other, other_cfg = model_for("adapter", adapter_size=8)
    with pytest.raises(ValueError, match="adapter_size"):
        PEFT[other_cfg.finetune].load(other, weights, {})
    with pytest.raises(ValueError, match="missing"):
        PEFT[other_cfg.finetune].load(other, {}, {})
    assert "absorb" in PEFT["adapter"].why_no_merge and "attention positions" in PEFT["prefix"].why_no_merge
    assert LoRA.why_no_merge is None
    assert isinstance(model_for("prefix")[1].prefix, PrefixEncoder)


# --- train.py -> checkpoint -> resume -> sample.py, in process ------------------------------------------

def base_and_data(tmp_path: Path) -> tuple[str, str]:
    """A random base checkpoint (GPT-2's vocabulary, tiny width) and a JSONL of 40 prompt/response pairs."""
    cfg = dataclasses.replace(SMALL, vocab_size=50304)
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "base", checkpoint.Checkpoint(step=0, config=cfg.to_dict(), model=GPT(cfg).state_dict()))
    pairs = [{"prompt": f"Who says line {i}?", "response": f" SPEAKER {i % 3}"} for i in range(40)]
    return str(tmp_path / "base"), str(write_sft_jsonl(pairs, tmp_path / "pairs.jsonl"))


def run_train(config: str, out_dir: Path, base: str, data: str, *extra: str) -> None:
    import train  # the loop itself, in this process: no interpreter start-up per run

    train.main([config, f"--out_dir={out_dir}", f"--init_from={base}", f"--sft_data={data}", "--n_layer=2",
                "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=1", "--log_interval=1",
                "--eval_interval=4", "--save_interval=2", "--warmup_iters=0", "--lr=3e-3", "--min_lr=3e-3", "--dtype=float32",
                "--prefix_len=3", "--prefix_hidden=16", "--adapter_size=4", *extra])


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("finetune", ["prefix", "adapter"])
def test_train_save_resume_and_sample_round_trip(tmp_path, finetune, capsys, monkeypatch):
    import sample

    base, data = base_and_data(tmp_path)
    config = f"configs/{finetune}.py"
    if finetune == "prefix":  # its resume reloads the MLP from train_only: the same losses as a run never stopped
        run_train(config, tmp_path / "straight", base, data, "--max_iters=4")
    run_train(config, tmp_path / "run", base, data, "--max_iters=2")
    run_train(config, tmp_path / "run", base, data, "--max_iters=4", "--init_from=resume")
    if finetune == "prefix":  # the constant lr makes 2 + 2 steps the same as 4, bit for bit
        assert losses(tmp_path / "run") == losses(tmp_path / "straight")

    ck = checkpoint.load(tmp_path / "run")
    cfg = Config.from_dict(ck.config)
    assert ck.step == 4 and ck.extra["adapter"]["finetune"] == finetune and ck.extra["adapter"]["base_sha256"]
    weights, train_only = PEFT[cfg.finetune].saved(PEFT[cfg.finetune].apply(GPT(cfg), cfg))
    assert set(ck.model) == set(weights) and set(ck.train_only) == set(train_only)  # only what the method trained
    loaded = sample.load_model(str(tmp_path / "run"))  # the base, the method applied for inference, its tensors
    resumable = PEFT[cfg.finetune].apply(load_pretrained(cfg, base), cfg)  # as a resumed run rebuilds it
    PEFT[cfg.finetune].load(resumable, ck.model, ck.train_only)
    x = tokens(T=10)
    assert torch.equal(loaded(x), resumable(x))
    from nanoft.tools.merge import merge_checkpoint
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_checkpoint(str(tmp_path / "run"), str(tmp_path / "merged"))
    monkeypatch.setattr(sys, "argv", ["sample.py", str(tmp_path / "run"), "--prompt=Who says", "--max_new_tokens=3"])
    capsys.readouterr()
    sample.main()
    assert capsys.readouterr().out.startswith("Who says")


@pytest.mark.parametrize("finetune, overrides", [("prefix", {}), ("prefix", {"dropout": 0.1}),
                                                 ("adapter", {"optimizer": "adamw8bit"})])
def test_memory_estimator_knows_prefix_and_adapters(finetune, overrides):
    """Parameters, gradients and optimizer states estimated to the byte against a real step, and what autograd
    saves in one block within 5% (a block's, measured as gradient checkpointing's recompute: the loss head is not
    these methods' business). The config's LoRA targets are ignored by both methods, in the model and the estimate."""
    from nanoft.tools.memory.command import build, exact_bytes, saved_activation_bytes, train_step
    from nanoft.tools.memory.estimate import Run, activation_bytes
    from nanoft.tools.memory.peak import peak_bytes
    from nanoft.tools.memory.shape import ModelShape

    cfg = dataclasses.replace(SMALL, finetune=finetune, n_head=4, n_embd=64, vocab_size=500, batch_size=3,
                              prefix_len=5, prefix_hidden=24, adapter_size=8, gradient_checkpointing=True, **overrides)
    run, shape = Run.from_config(cfg), ModelShape.from_config(cfg)
    model, opt = build(cfg, "cpu")
    grads = train_step(model, opt, run, torch.Generator().manual_seed(0), {})
    got, est = {**exact_bytes(model, opt), "grads": grads}, peak_bytes(shape, run)
    assert {k: est[k] for k in ("params", "grads", "states")} == {k: got[k] for k in ("params", "grads", "states")}
    block = saved_activation_bytes(model, run, torch.Generator().manual_seed(0))["recompute"]
    assert block > 0 and abs(activation_bytes(shape, run)["recompute"] - block) <= 0.05 * block


def test_the_kv_cache_keeps_the_prefixes_in_front():
    """Generation's cache holds the sequence's keys and values; the prefixes go in front of them at every call,
    whether one new position or several follow the cache (then the widened mask is explicit)."""
    from nanoft.model.gpt import KVCache

    _, model, _ = model_for("prefix")
    model.eval()
    x = tokens(B=2, T=10)
    cache = [KVCache(SMALL.block_size) for _ in model.blocks]
    model.next_token_logits(x[:, :6], cache)
    torch.testing.assert_close(model.next_token_logits(x[:, 6:7], cache), model.next_token_logits(x[:, :7]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.next_token_logits(x[:, 7:10], cache), model.next_token_logits(x), rtol=1e-5,
                               atol=1e-5)
    prompt = x[:1, :4]
    greedy = [torch.cat(list(model.generate(prompt, 8, temperature=0, use_cache=c)), dim=1) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
