"""A minimal GPT, shaped like GPT-2 so that GPT-2's weights load into it.

Token + learned position embeddings -> n_layer pre-LayerNorm blocks (causal self-attention, GELU MLP)
-> final LayerNorm -> a head whose weight is the token embedding (weight tying; tie_embeddings=False: its own).

The attention projections are separate `q_proj`, `k_proj`, `v_proj`, `out_proj` (GPT-2 fuses q, k, v
into one `c_attn`; nanoft.interop.hf splits it at load time) so that LoRA can target each one by name.

Attention (Vaswani et al., 2017, https://arxiv.org/abs/1706.03762), per head, with hs the head size:

    y = softmax(Q K^T / sqrt(hs) + M) V        M[i, j] = 0 where key j is not after query i, -inf where it is

`explicit_attention` writes this out; the model calls PyTorch's F.scaled_dot_product_attention, which
computes the same numbers with fused kernels (flash attention never holds the (T, T) scores in memory),
or the written-out path when a layer's `use_sdpa` is False. `generate` keeps each layer's keys and values
(`KVCache`), so that a new token costs one position's forward instead of the whole context's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nanoft.config import Config
from nanoft.model.chunked_loss import linear_cross_entropy

# sequence length up to which bf16 attention on a CPU runs in float32: fwd + bwd at 16 x 4 heads x 64, measured
# on 2 cores: T = 64 2.6x faster in float32, T = 128 1.7x, T = 256 even, T = 512 0.88x (bench/bench_attention.py)
CPU_FLOAT32_ATTENTION_UP_TO = 256


def causal_mask(T_q: int, T_k: int, device: torch.device | str | None = None) -> Tensor:
    """(T_q, T_k) booleans, True where a query may look. The queries are the last T_q of the T_k positions
    (keys from a KV cache or a prefix come first), so query i sees keys 0 .. T_k - T_q + i."""
    return torch.ones(T_q, T_k, dtype=torch.bool, device=device).tril(T_k - T_q)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """What F.scaled_dot_product_attention computes, written out: q (B, nh, T_q, hs), k and v (B, nh, T_k, hs)
    -> (B, nh, T_q, hs). Slower, and it holds the (T_q, T_k) scores in memory; the numbers agree with SDPA's
    to float rounding (tests/model/test_gpt.py)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T_q, T_k): each query against each key
    scores = scores.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device), float("-inf"))  # exp(-inf) = 0
    weights = F.dropout(F.softmax(scores, dim=-1), p=dropout_p)  # each row a distribution over the visible keys
    return weights @ v  # each query's weighted mean of the values


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, sdpa: bool = True) -> Tensor:
    """Causal attention of the last T_q positions over all T_k: SDPA, or explicit_attention when sdpa is False."""
    if not sdpa:
        return explicit_attention(q, k, v, dropout_p)
    T_q, T_k = q.size(-2), k.size(-2)
    # is_causal lets query i see keys 0..i, right when T_q == T_k; a single query (a cached generation step) is the
    # newest position and sees every key; otherwise (a prefix, or several new tokens after a cache) an explicit mask
    mask = None if T_q in (1, T_k) else causal_mask(T_q, T_k, q.device)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and T_k <= CPU_FLOAT32_ATTENTION_UP_TO:
        # torch's CPU flash attention runs short bf16 sequences at half its float32 speed: there float32 is faster,
        # and exact to more bits (bench/bench_attention.py)
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=T_q == T_k)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=T_q == T_k)


class KVCache:
    """One attention layer's keys and values of the positions seen so far, so that generation computes each once.

    Buffers of max_len positions, filled left to right: `append` writes the new positions' k and v
    (B, nh, T, hs) after the `length` already there and returns all of them, (B, nh, length + T, hs).
    """

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:  # allocated at first use, when the batch size, dtype (autocast's) and device are known
            B, nh, _, hs = k.shape
            self.k, self.v = k.new_empty(B, nh, self.max_len, hs), v.new_empty(B, nh, self.max_len, hs)
        end = self.length + k.size(2)
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.prefix = None  # prefix tuning (nanoft.peft.prefix) sets it: a callable giving this layer's (P, C) keys, values
        self.use_sdpa = True  # False: explicit_attention, the same maths written out (to read or step through)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:  # generation: the earlier positions' keys and values come first
            k, v = kv_cache.append(k, v)  # (B, nh, L + T, hs)
        if self.prefix is not None:  # P trained keys/values before the sequence: every query sees all of them
            pk, pv = (t.to(k.dtype).view(1, -1, self.n_head, hs).transpose(1, 2).expand(B, -1, -1, -1) for t in self.prefix())
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)  # (B, nh, P + T, hs)
        y = attention(q, k, v, self.dropout if self.training else 0.0, sdpa=self.use_sdpa)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc_in = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.fc_out = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2 used the tanh approximation of GELU; match it so its weights behave as trained
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)  # pre-LN: normalise the branch input, keep the residual clean
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embeddings
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds and un-embeds
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections that add into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def use_quantized_layers(self, quant: dict) -> None:
        """Swap the Linears named in quant["layers"] for empty layers of quant["format"] (a name in
        nanoft.quant.FORMATS, built with quant["params"]), ready for a quantized checkpoint's weights."""
        from nanoft.quant import FORMATS  # here, not at the top: a float GPT never loads the quantized formats

        if quant["format"] not in FORMATS:
            raise ValueError(f"unknown quantized format {quant['format']!r}; known: {', '.join(FORMATS)}")
        layer_class = FORMATS[quant["format"]]
        for name in quant["layers"]:
            parent, _, attr = name.rpartition(".")
            old = self.get_submodule(name)
            new = layer_class(old.in_features, old.out_features, old.bias is not None, **quant["params"])
            setattr(self.get_submodule(parent), attr, new)

    def dequantize_layers(self) -> None:
        """Turn every quantized Linear back into an nn.Linear holding its dequantized float32 weight: the same
        function, now trainable (a run that starts from a quantized checkpoint trains from its numbers)."""
        for name, module in list(self.named_modules()):
            if isinstance(module, nn.Linear) or not hasattr(module, "dequantize"):
                continue
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize(torch.float32))
                if module.bias is not None:
                    linear.bias.copy_(module.bias.float())
            parent, _, attr = name.rpartition(".")
            setattr(self.get_submodule(parent), attr, linear)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied head shares wte); non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx: Tensor, kv_cache: list[KVCache] | None = None) -> Tensor:
        """idx (B, T) token ids -> the final LayerNorm's output (B, T, n_embd), before the head: what DPO,
        the reward model and distillation turn into their own losses (see nanoft/model/logprobs.py)."""
        T = idx.size(1)
        start = kv_cache[0].length if kv_cache is not None else 0  # the cache holds positions 0 .. start - 1
        if start + T > self.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; recompute its activations during backward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache[i] if kv_cache is not None else None)
        return self.ln_f(x)

    def forward(self, idx: Tensor, targets: Tensor | None = None, loss_mask: Tensor | None = None,
                kv_cache: list[KVCache] | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab) of every position; or, given targets (B, T), the loss:
        the mean next-token cross-entropy over the positions where loss_mask is 1 (all when it is None; -1
        targets are ignored too), computed chunk by chunk without ever holding the (B, T, vocab) logits
        (nanoft/model/chunked_loss.py). Training calls `model(x, y)` and generation `model(idx, kv_cache=...)`:
        both through forward, so DDP's hooks, FSDP's gathers and torch.compile see them.
        kv_cache (generation): one KVCache per layer; idx then continues the positions the caches hold."""
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab)
        if loss_mask is not None:
            targets = targets.masked_fill(loss_mask == 0, -1)
        return linear_cross_entropy(x, self.lm_head.weight, targets)

    def next_token_logits(self, idx: Tensor, kv_cache: list[KVCache] | None = None) -> Tensor:
        """(B, vocab) logits of the token after idx (B, T), through forward (see there for kv_cache)."""
        return self(idx, kv_cache=kv_cache)[:, -1, :]

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True):
        """Sample max_new_tokens after idx (B, T), yielding each new (B, 1) token as it is produced.

        Each token is predicted from the last block_size tokens, at positions 0, 1, ... as in training.
        use_cache keeps every layer's keys and values: the prompt runs once, then each new token is a forward
        of one position, while the sequence fits in block_size. After that the window slides and every token in
        it moves to a new position; with learned position embeddings all its keys and values change, so
        each token recomputes its whole window, as use_cache=False does for every token. Both give the same
        tokens (greedy: identical; the logits differ by float rounding, tests/model/test_generate.py).
        """
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= self.block_size:
                if cache is None:  # the prompt: every position once
                    cache = [KVCache(self.block_size) for _ in self.blocks]
                    logits = self.next_token_logits(idx, cache)
                else:  # only the newest token; the earlier ones' keys and values are in the cache
                    logits = self.next_token_logits(idx[:, -1:], cache)
            else:
                logits = self.next_token_logits(idx[:, -self.block_size:])  # crop to the context window
            logits = logits.float()  # (B, vocab)
            if temperature <= 0:  # greedy
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
            yield next_id
