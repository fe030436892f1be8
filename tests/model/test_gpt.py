"""The GPT model: causality, loss at init, SDPA against explicit attention, GPT-2 weight layout."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nanoft.config import Config
from nanoft.interop.hf import gpt2_state_dict
from nanoft.model.gpt import GPT, attention, explicit_attention

CFG = Config(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=512, dropout=0.0)


def test_changing_future_tokens_leaves_past_logits_unchanged():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, CFG.vocab_size, (2, 6))
    logits_a = model(idx)
    logits_b = model(changed)
    torch.testing.assert_close(logits_a[:, :10], logits_b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(logits_a[:, 10:], logits_b[:, 10:])


def test_loss_at_init_is_close_to_ln_vocab():
    torch.manual_seed(0)
    model = GPT(CFG)
    idx = torch.randint(0, CFG.vocab_size, (4, 32))
    targets = torch.randint(0, CFG.vocab_size, (4, 32))
    loss = model(idx, targets)
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.1


def test_sdpa_equals_explicit_attention():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, CFG.n_embd)
    B, T, C = x.shape
    hs = C // attn.n_head
    q = attn.q_proj(x).view(B, T, attn.n_head, hs).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_head, hs).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_head, hs).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn(x), attn.out_proj(y), rtol=1e-5, atol=1e-5)


def test_short_bf16_attention_on_a_cpu_runs_in_float32():
    """Up to CPU_FLOAT32_ATTENTION_UP_TO positions, bf16 q, k, v are attended in float32 (faster there, and closer
    to the exact result: the float64 attention), rounded to bf16 once at the end; beyond it, in bf16."""
    from nanoft.model.gpt import CPU_FLOAT32_ATTENTION_UP_TO, attention

    torch.manual_seed(0)
    for T in (CPU_FLOAT32_ATTENTION_UP_TO, 2 * CPU_FLOAT32_ATTENTION_UP_TO):
        q, k, v = (torch.randn(1, 2, T, 16).bfloat16() for _ in range(3))
        got = attention(q, k, v)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        upcast = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
        assert got.dtype == torch.bfloat16
        if T <= CPU_FLOAT32_ATTENTION_UP_TO:
            assert torch.equal(got, upcast)
            assert (got.double() - exact).abs().max() <= (F.scaled_dot_product_attention(q, k, v, is_causal=True)
                                                          .double() - exact).abs().max()
        else:
            assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_the_models_written_out_attention_path_equals_sdpa():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    sdpa_logits = model(idx)
    for block in model.blocks:
        block.attn.use_sdpa = False  # explicit_attention: softmax(Q K^T / sqrt(hs) + causal mask) V
    explicit_logits = model(idx)
    torch.testing.assert_close(explicit_logits, sdpa_logits, rtol=1e-5, atol=1e-5)
    # queries that are the last T_q of T_k positions (after a KV cache or a prefix): the mask aligns to the end
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)
    for T_q in (1, 3):
        torch.testing.assert_close(attention(q[:, :, -T_q:], k, v), explicit_attention(q[:, :, -T_q:], k, v),
                                   rtol=1e-5, atol=1e-5)
    # of 3 queries over 7 keys, the middle one is position 5: it sees keys 0..5, not key 6
    middle_alone = explicit_attention(q[:, :, 1:2], k[:, :, :6], v[:, :, :6])
    torch.testing.assert_close(explicit_attention(q, k, v)[:, :, 1:2], middle_alone, rtol=1e-5, atol=1e-5)


def test_loss_mask_restricts_the_loss_to_masked_positions():
    torch.manual_seed(0)
    model = GPT(CFG)
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    mask = torch.zeros(2, 8, dtype=torch.long)
    mask[:, 5:] = 1
    logits, loss = model(idx), model(idx, idx, mask)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, CFG.vocab_size), idx[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_head_is_tied_to_the_embedding():
    model = GPT(CFG)
    assert model.lm_head.weight is model.wte.weight
    n_unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_params() == n_unique


def test_generate_streams_the_requested_number_of_tokens():
    model = GPT(CFG).eval()
    start = torch.zeros(1, 1, dtype=torch.long)
    tokens = list(model.generate(start, 5, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0)))
    assert len(tokens) == 5 and all(t.shape == (1, 1) for t in tokens)
    greedy = [t.item() for t in model.generate(start, 40, temperature=0)]  # crosses block_size: crops context
    assert len(greedy) == 40


def _fake_gpt2_file(path, cfg: Config, seed: int = 0) -> dict:
    """A small file in Hugging Face's GPT-2 layout: Conv1D weights stored (in, out), fused c_attn."""
    g = torch.Generator().manual_seed(seed)
    C, V = cfg.n_embd, cfg.vocab_size
    t = {"wte.weight": torch.randn(V, C, generator=g), "wpe.weight": torch.randn(64, C, generator=g),
         "ln_f.weight": torch.randn(C, generator=g), "ln_f.bias": torch.randn(C, generator=g)}
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            t[h + ln + ".weight"], t[h + ln + ".bias"] = torch.randn(C, generator=g), torch.randn(C, generator=g)
        t[h + "attn.c_attn.weight"], t[h + "attn.c_attn.bias"] = torch.randn(C, 3 * C, generator=g), torch.randn(3 * C, generator=g)
        t[h + "attn.c_proj.weight"], t[h + "attn.c_proj.bias"] = torch.randn(C, C, generator=g), torch.randn(C, generator=g)
        t[h + "mlp.c_fc.weight"], t[h + "mlp.c_fc.bias"] = torch.randn(C, 4 * C, generator=g), torch.randn(4 * C, generator=g)
        t[h + "mlp.c_proj.weight"], t[h + "mlp.c_proj.bias"] = torch.randn(4 * C, C, generator=g), torch.randn(C, generator=g)
    save_file(t, str(path))
    return t


def test_gpt2_layout_loads_with_transposes_and_split_attention(tmp_path):
    path = tmp_path / "model.safetensors"
    hf = _fake_gpt2_file(path, CFG)
    model = GPT(CFG)
    model.load_state_dict(gpt2_state_dict(path, CFG))
    C = CFG.n_embd
    torch.testing.assert_close(model.blocks[1].attn.k_proj.weight, hf["h.1.attn.c_attn.weight"][:, C:2 * C].t())
    torch.testing.assert_close(model.blocks[0].mlp.fc_in.weight, hf["h.0.mlp.c_fc.weight"].t())
    # the loaded layer computes what GPT-2's Conv1D computes: x @ W + b
    x = torch.randn(3, C)
    torch.testing.assert_close(model.blocks[0].attn.v_proj(x), x @ hf["h.0.attn.c_attn.weight"][:, 2 * C:] + hf["h.0.attn.c_attn.bias"][2 * C:])
    assert model.wpe.weight.shape[0] == CFG.block_size  # a prefix of the 64 stored positions


def test_gpt2_loading_rejects_a_mismatched_config(tmp_path):
    path = tmp_path / "model.safetensors"
    _fake_gpt2_file(path, CFG)
    with pytest.raises(ValueError, match="n_layer"):
        gpt2_state_dict(path, Config(**{**CFG.to_dict(), "n_layer": 3}))
    with pytest.raises(ValueError, match="vocab_size"):
        gpt2_state_dict(path, Config(**{**CFG.to_dict(), "vocab_size": 1024}))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        gpt2_state_dict(tmp_path / "junk.safetensors", CFG)


def test_block_size_is_enforced():
    with pytest.raises(ValueError, match="block_size"):
        GPT(CFG)(torch.zeros(1, CFG.block_size + 1, dtype=torch.long))
