"""GPT.generate with its KV cache against the path without one (use_cache=False: the whole cropped window
recomputed for every token, the reference), before and after the sequence reaches block_size."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoft.config import Config
from nanoft.data.tokenizer import get_tokenizer
from nanoft.model.gpt import GPT, KVCache
from nanoft.peft.lora import LoRALinear
from nanoft.peft.prefix import apply_prefix
from nanoft.quant.nf4 import Linear4bit
from nanoft.run import checkpoint

ROOT = Path(__file__).resolve().parents[2]
CFG = Config(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=512, dropout=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny forwards: one thread is faster than two contending on a busy machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_with_distinct_tokens(cfg: Config = CFG, seed: int = 0) -> GPT:
    """A random model with its linear layers scaled up: logits far apart (greedy choices are no float ties) and
    varied greedy tokens (at GPT-2's init scale a random model repeats one token)."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for module in model.blocks.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(3)
    return model


def greedy(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool) -> list[list[int]]:
    return torch.cat(list(model.generate(prompt, n, temperature=0, use_cache=use_cache)), dim=1).tolist()


def test_greedy_tokens_with_the_cache_equal_those_without_it_past_block_size():
    model = model_with_distinct_tokens()
    prompt = torch.randint(0, CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    n = 2 * CFG.block_size  # 27 tokens while the sequence fits, then 37 with a sliding window
    cached, reference = greedy(model, prompt, n, use_cache=True), greedy(model, prompt, n, use_cache=False)
    assert cached == reference
    assert len(set(cached[0])) > 5  # not one token repeated: the comparison has something to see


def test_a_prompt_longer_than_block_size_is_cropped_the_same_way():
    model = model_with_distinct_tokens()
    prompt = torch.randint(0, CFG.vocab_size, (1, CFG.block_size + 7), generator=torch.Generator().manual_seed(2))
    assert greedy(model, prompt, 10, use_cache=True) == greedy(model, prompt, 10, use_cache=False)


def test_sampled_tokens_with_the_cache_equal_those_without_it():
    model = model_with_distinct_tokens()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def sample(use_cache):
        g = torch.Generator().manual_seed(3)
        return [t.item() for t in model.generate(prompt, 50, temperature=1.0, top_k=20, generator=g, use_cache=use_cache)]
    assert sample(True) == sample(False)


def test_cached_logits_equal_full_forward_logits_at_every_position():
    model = model_with_distinct_tokens()
    seq = torch.randint(0, CFG.vocab_size, (2, CFG.block_size), generator=torch.Generator().manual_seed(4))
    cache = [KVCache(CFG.block_size) for _ in model.blocks]
    with torch.no_grad():
        steps = [model.next_token_logits(seq[:, :4], cache)]  # a 4-token prompt, then one token at a time
        steps += [model.next_token_logits(seq[:, t:t + 1], cache) for t in range(4, CFG.block_size)]
        for t, logits in zip(range(3, CFG.block_size), steps):
            torch.testing.assert_close(logits, model.next_token_logits(seq[:, :t + 1]), rtol=1e-5, atol=1e-5)


def test_each_cached_step_runs_one_position_until_the_window_is_full():
    model = model_with_distinct_tokens()
    lengths = []
    model.blocks[0].attn.q_proj.register_forward_hook(lambda mod, args, out: lengths.append(args[0].size(1)))
    list(model.generate(torch.zeros(1, 5, dtype=torch.long), 30, temperature=0))
    # the prompt once; tokens 6..32 one position each; then the full cropped window for every token
    assert lengths == [5] + [1] * (CFG.block_size - 5) + [CFG.block_size] * (30 - 1 - (CFG.block_size - 5))


def test_a_cache_past_block_size_is_refused():
    model = model_with_distinct_tokens()
    cache = [KVCache(CFG.block_size) for _ in model.blocks]
    with torch.no_grad():
        model.next_token_logits(torch.zeros(1, CFG.block_size, dtype=torch.long), cache)
        with pytest.raises(ValueError, match=f"^sequence length {CFG.block_size + 1} exceeds block_size {CFG.block_size}$"):
            model.next_token_logits(torch.zeros(1, 1, dtype=torch.long), cache)


def test_the_cache_runs_through_lora_and_qlora_layers():
    """LoRALinear and Linear4bit replace nn.Linear; the cached path goes through their forward like any other."""
    base = model_with_distinct_tokens()
    prompt = torch.randint(0, CFG.vocab_size, (1, 4), generator=torch.Generator().manual_seed(5))
    before = greedy(base, prompt, 40, use_cache=False)
    torch.manual_seed(6)
    for block in base.blocks:
        attn = block.attn
        attn.q_proj = LoRALinear(attn.q_proj, r=4, alpha=8.0)
        attn.v_proj = LoRALinear(Linear4bit.from_linear(attn.v_proj), r=4, alpha=8.0)  # QLoRA: an NF4 base
        for layer in (attn.q_proj, attn.v_proj):
            torch.nn.init.normal_(layer.lora_B, std=2.0)  # a trained adapter, not the zero start
    after = greedy(base, prompt, 40, use_cache=True)
    assert after == greedy(base, prompt, 40, use_cache=False)
    assert after != before  # the adapters change what is generated, so they were on the path


def test_the_cache_keeps_prefix_tunings_keys_before_the_sequence():
    """Prefix tuning puts P trained keys/values before the cached ones; every query sees them all."""
    model = model_with_distinct_tokens()
    prompt = torch.randint(0, CFG.vocab_size, (1, 4), generator=torch.Generator().manual_seed(8))
    before = greedy(model, prompt, 40, use_cache=False)
    apply_prefix(model, dataclasses.replace(CFG, prefix_len=3), torch.float32, reparameterise=False)
    torch.manual_seed(9)
    with torch.no_grad():
        for p in model.prefix.parameters():
            p.normal_(std=3.0)  # trained prefixes, not the initial ones
    after = greedy(model, prompt, 40, use_cache=True)
    assert after == greedy(model, prompt, 40, use_cache=False)
    assert after != before


def test_sample_py_streams_the_tokens_of_the_uncached_path(tmp_path):
    cfg = Config(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)  # GPT-2's vocabulary: sample.py decodes
    model = model_with_distinct_tokens(cfg, seed=7)
    checkpoint.save(tmp_path, checkpoint.Checkpoint(step=1, config=cfg.to_dict(), model=model.state_dict()))
    enc = get_tokenizer()
    prompt = torch.tensor([enc.encode("ROMEO:")])
    expected = [t for t in greedy(model, prompt, 40, use_cache=False)[0] if t < enc.n_vocab]
    r = subprocess.run([sys.executable, "sample.py", str(tmp_path), "--prompt", "ROMEO:", "--max_new_tokens=40",
                        "--temperature=0", "--device=cpu"], cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode() == "ROMEO:" + enc.decode_bytes(expected).decode("utf-8", errors="replace") + "\n"
