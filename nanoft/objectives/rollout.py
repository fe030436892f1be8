"""Rollouts: responses sampled from the policy with the KV cache, scored by a reward model, as padded rows.

A rollout starts from prompts (token ids) and samples n responses to each with `GPT.generate` (the KV cache:
each new token is one position's forward). Prompts of one length are sampled together as one batch (the
model has no padding mask, and learned positions forbid shifting a prompt); a response ends at the first stop
token (included) or after max_new_tokens, and never runs past block_size. The rows are then (ids, n_prompt)
pairs, which `nanoft.data.sft.collate` turns into x, y and a mask on the response's tokens, exactly as SFT
batches: position t of x predicts y[t], and the mask marks the positions whose target is a response token.

The stop tokens: "eos" stops at <|endoftext|> only; "newline" also at any token whose text holds a newline
(the plays' preference pairs answer with one line, so their reward model only ever saw one-line responses).

`response_logprobs` gives log pi(token) of every response token with pi = softmax(logits / temperature): the
distribution the tokens were sampled from (trl does the same), so the PPO ratio and the KL compare like with like.
"""
from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import Tensor, nn

from nanoft.data.sft import collate
from nanoft.data.tokenizer import EOT_ID, get_tokenizer
from nanoft.model.logprobs import token_logprobs
from nanoft.objectives.reward import rewards


@functools.cache
def stop_ids(stop: str) -> frozenset[int]:
    """<|endoftext|>, and for "newline" every GPT-2 token whose text contains a newline."""
    if stop == "eos":
        return frozenset({EOT_ID})
    enc = get_tokenizer()
    return frozenset({EOT_ID} | {i for i in range(enc.n_vocab - 1) if b"\n" in enc.decode_single_token_bytes(i)})


def prompts_of(x: Tensor, mask: Tensor) -> list[list[int]]:
    """The prompt of each row of an SFT-style batch: x up to and including the position before the first
    masked one (the mask starts where the first response token is the target)."""
    starts = mask.argmax(dim=1).tolist()  # first masked position = n_prompt - 1
    return [x[i, :s + 1].tolist() for i, s in enumerate(starts)]


@torch.no_grad()
def sample(model: nn.Module, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
           stop: frozenset[int], generator: torch.Generator | None = None) -> tuple[list[list[int]], list[bool]]:
    """(responses, stopped): n responses per prompt, in order (prompt 0's n, then prompt 1's, ...), each a list
    of token ids ending at its first stop token, or cut at max_new_tokens (then stopped is False). temperature
    0 is greedy. The caller puts the model in eval mode."""
    device = model.lm_head.weight.device
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    responses: list[list[int] | None] = [None] * (len(prompts) * n)
    stopped = [False] * (len(prompts) * n)
    for length, which in by_length.items():
        rows = [k * n + j for k in which for j in range(n)]
        idx = torch.tensor([prompts[k] for k in which for _ in range(n)], device=device)  # (rows, length)
        limit = min(max_new_tokens, model.block_size - length)  # prompt + response fits block_size
        if limit < 1:
            raise ValueError(f"a prompt of {length} tokens leaves no room for a response in block_size={model.block_size}")
        stops = torch.tensor(sorted(stop), device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        tokens = []
        for token in model.generate(idx, limit, temperature=temperature, generator=generator):  # (rows, 1)
            tokens.append(token[:, 0])
            done |= torch.isin(token[:, 0], stops)
            if done.all():  # a CPU-GPU sync per token: generation stops as soon as every row has
                break
        out = torch.stack(tokens, dim=1).tolist()  # (rows, new)
        for r, ids in zip(rows, out):
            end = next((t + 1 for t, i in enumerate(ids) if i in stop), None)
            responses[r], stopped[r] = (ids[:end], True) if end else (ids, False)
    return responses, stopped


def as_rows(prompts: list[list[int]], responses: list[list[int]], n: int, block_size: int,
            device) -> tuple[Tensor, Tensor, Tensor]:
    """x, y, mask (R, T) of prompt + response rows (prompt k repeated n times), the mask on the response."""
    rows = [(prompts[r // n] + resp, len(prompts[r // n])) for r, resp in enumerate(responses)]
    return tuple(t.to(device) for t in collate(rows, block_size))


def response_logprobs(model: nn.Module, x: Tensor, y: Tensor, mask: Tensor, temperature: float,
                      value_head: nn.Module | None = None) -> tuple[Tensor, Tensor | None]:
    """(log pi(y_t) (R, T) float32, zero outside the mask; values (R, T) from value_head, or None). The hidden
    state at position t is the state before response token y_t: both the policy and the value read it."""
    hidden = model.hidden_states(x)  # (R, T, C)
    counted = mask.bool()
    h = hidden[counted]  # (N, C) the response positions only
    logp = token_logprobs(h / temperature, model.lm_head.weight, y[counted])  # softmax(W h / T)
    logps = torch.zeros(mask.shape, device=x.device, dtype=logp.dtype).masked_scatter(counted, logp)
    if value_head is None:
        return logps, None
    v = value_head(h).squeeze(-1).float()
    return logps, torch.zeros(mask.shape, device=x.device, dtype=v.dtype).masked_scatter(counted, v)


@torch.no_grad()
def reward_scores(reward_model: nn.Module, prompts: list[list[int]], responses: list[list[int]], n: int) -> Tensor:
    """(R,) the reward model's score of each prompt + response (prompt k repeated n times), read as it was
    trained (nanoft/objectives/reward.py): the rows as SFT rows ending in <|endoftext|>, so the head reads the
    hidden state whose input is the response's last token."""
    device = reward_model.lm_head.weight.device
    rows = [(prompts[r // n] + resp + [EOT_ID], len(prompts[r // n])) for r, resp in enumerate(responses)]
    x, _, mask = (t.to(device) for t in collate(rows, reward_model.block_size))
    return rewards(reward_model, x, mask)
