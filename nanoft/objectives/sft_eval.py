"""Measuring a fine-tuned model on SFT examples: does it answer, and is the answer right?

`score_answers` measures any task, the user's JSONL too: does the model, decoding greedily, answer with
one of the task's answers and stop, and is it the right one? `score_speaker_task` measures a task with a
closed set of answers, such as the embedded speaker task (nanoft/data/speaker_task.py), by ranking the answers
by their log-likelihood; `majority_baseline` is what always giving the most common answer scores.
`task_report` is the line train.py prints after fine-tuning.
"""
from __future__ import annotations

from collections import Counter

import torch

from nanoft.data.sft import SFTExample, collate, fit_to_block
from nanoft.data.tokenizer import EOT_ID
from nanoft.model.logprobs import sequence_logprobs

SCORED_EXAMPLES = 300  # the val examples the scores look at (the val split is already shuffled)


def majority_baseline(examples: list[SFTExample]) -> float:
    """Accuracy of always answering the most frequent response: what a model must beat."""
    counts = Counter(ex.response for ex in examples)
    return counts.most_common(1)[0][1] / len(examples)


@torch.no_grad()
def score_speaker_task(model: torch.nn.Module, examples: list[SFTExample], device: str | torch.device,
                       max_examples: int = SCORED_EXAMPLES, rows_per_forward: int = 64) -> float:
    """Accuracy at naming the speaker, by ranking: for each example, every candidate answer (the distinct
    responses among `examples`) is scored by its log-likelihood log p(response + <|endoftext|> | prompt),
    summed over its tokens, and the best is the prediction. This is cheaper than greedy generation (one
    forward per candidate, no sampling loop), needs no parsing of free text, and cannot miss by spelling;
    the <|endoftext|> makes " KING" lose to " KING LEAR" when the line is Lear's.
    Scores the first max_examples examples (the val split is already shuffled). Compare with
    majority_baseline(examples) and with the base model's score."""
    examples = examples[:max_examples]
    candidates = sorted({ex.response_ids for ex in examples})
    block_size = model.block_size
    rows, truth = [], []
    for ex in examples:
        for cand in candidates:
            fitted = fit_to_block(SFTExample(ex.prompt, "", ex.prompt_ids, cand), block_size)
            if fitted is None:
                raise ValueError(f"candidate answer of {len(cand)} tokens does not fit block_size={block_size}")
            rows.append(fitted)
        truth.append(candidates.index(ex.response_ids))
    was_training = model.training
    model.eval()  # no dropout while measuring
    scores = []
    try:
        for i in range(0, len(rows), rows_per_forward):
            x, y, mask = (t.to(device) for t in collate(rows[i:i + rows_per_forward], block_size))
            # (R,) log p(answer | prompt): only the answer's positions reach the head, not every (R, T, vocab) logit
            scores.append(sequence_logprobs(model, x, y, mask).cpu())
    finally:
        model.train(was_training)
    pred = torch.cat(scores).view(len(examples), len(candidates)).argmax(dim=1)
    return (pred == torch.tensor(truth)).float().mean().item()


@torch.no_grad()
def score_answers(model: torch.nn.Module, examples: list[SFTExample], device: str | torch.device,
                  max_examples: int = SCORED_EXAMPLES) -> dict[str, float]:
    """What the model answers, decoding greedily after each prompt until <|endoftext|> (or as many tokens as
    the longest expected answer, plus one): {"exact": the fraction whose answer, <|endoftext|> included,
    is the expected one; "valid": the fraction that answer with one of the answers found among `examples`
    and stop}. "valid" is what fine-tuning changes first: a base model goes on writing text where a tuned
    one answers. For a closed set of answers (the speaker task's six names) valid - exact counts the wrong
    names. Scores the first max_examples examples, one at a time: the prompts have different lengths."""
    examples = examples[:max_examples]
    answers = {ex.response_ids for ex in examples}
    max_new = max(len(a) for a in answers) + 1  # one more: a model that does not stop is not cut to size
    was_training = model.training
    model.eval()
    exact = valid = 0
    try:
        for ex in examples:
            prompt = list(ex.prompt_ids[-max(1, model.block_size - max_new):]) or [EOT_ID]  # answer fits too
            out = []
            for token in model.generate(torch.tensor([prompt], device=device), max_new, temperature=0):
                out.append(token.item())
                if out[-1] == EOT_ID:
                    break
            exact += tuple(out) == ex.response_ids
            valid += tuple(out) in answers
    finally:
        model.train(was_training)
    return {"exact": exact / len(examples), "valid": valid / len(examples)}


MAX_SCORED_ANSWER = 32  # tokens: longer answers are not scored by exact match after fine-tuning


def task_report(model: torch.nn.Module, examples: list[SFTExample], device: str | torch.device,
                speaker_task: bool) -> str:
    """The line train.py prints after fine-tuning: greedy answers on the val split and, for the speaker task,
    its ranking accuracy beside the majority baseline."""
    n = min(SCORED_EXAMPLES, len(examples))
    longest = max(len(e.response_ids) for e in examples[:n])
    if longest > MAX_SCORED_ANSWER:  # free text: slow to decode, and an exact match would say little
        return f"val answers: not scored (answers of up to {longest} tokens; exact match is for short answers)"
    got = score_answers(model, examples, device, max_examples=n)
    line = (f"val answers (greedy, {n} prompts): {got['valid']:.1%} are one of the task's answers, "
            f"{got['exact']:.1%} the right one")
    if speaker_task:
        line += (f"\nspeaker task accuracy (ranking the {len({e.response for e in examples[:n]})} names): "
                 f"{score_speaker_task(model, examples, device):.3f} (always the most common: {majority_baseline(examples[:n]):.3f})")
    return line
