"""The embedded fine-tuning task: given one verse line of Shakespeare, name its speaker.

It needs no download beyond the Shakespeare plays the corpus already caches (nanoft/data/shakespeare.py), and it is
chosen so that fine-tuning shows up as a change in what the model does: among the chief speakers of six
tragedies (SPEAKER_TASK_PLAYS), balanced, so that always giving the most common answer scores 1/6.

    {"prompt": "Line: To be, or not to be, that is the question:\nSpeaker:\n", "response": "HAMLET"}

nanoft/data/sft.py turns these examples into batches (and writes its split under DATA_ROOT/speaker_task/);
nanoft/objectives/sft_eval.py scores a model on them (score_speaker_task ranks the six names by likelihood).
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from nanoft.data import tokens
from nanoft.data.shakespeare import all_speaker_lines

SAMPLE_SEED = 0  # fixed: every run and every machine builds the same examples

# (play title, number of its chief speakers taken): each play's most frequent speakers by line count.
# One speaker per play keeps the task learnable by a CPU-sized model: the plays' own vocabulary (names,
# places) is a cue, while telling apart two speakers of one play from a single line is hard even for people.
SPEAKER_TASK_PLAYS = (("Hamlet", 1), ("Othello", 1), ("Julius Caesar", 1), ("King Lear", 1), ("Macbeth", 1),
                      ("Romeo and Juliet", 1))
PER_SPEAKER = 600  # lines per speaker (balanced classes, so chance = majority = 1/6)
MIN_WORDS = 4  # shorter lines ("Ay, my lord.") say too little about who speaks them


def speaker_prompt(line: str) -> str:
    """The answer starts a new line, as speaker names do in the plays ("\n\nHAMLET:\n..."), so it is made of
    the tokens the base saw there: "HAM" "LET". Written as " HAMLET" after "Speaker:" it would be " HAM" "LET",
    and " HAM" is a token the base almost never saw, which a frozen base may be unable to make likely at all."""
    return f"Line: {line}\nSpeaker:\n"


def build_speaker_task(plays: tuple = SPEAKER_TASK_PLAYS, per_speaker: int = PER_SPEAKER) -> list[dict]:
    """The speaker task's examples from the cached Shakespeare corpus: deterministic, offline once cached."""
    lines = all_speaker_lines()
    wanted = dict(plays)
    missing = set(wanted) - {p for p, _, _ in lines}
    if missing:
        raise ValueError(f"speaker task: plays {sorted(missing)} are not in the Shakespeare corpus")
    counts = Counter((p, s) for p, s, _ in lines if p in wanted)
    speakers = {(p, s) for p, n in wanted.items() for (pp, s), _ in
                sorted(((k, c) for k, c in counts.items() if k[0] == p), key=lambda kc: -kc[1])[:n]}
    by_speaker: dict[tuple[str, str], list[str]] = {k: [] for k in sorted(speakers)}
    for p, s, line in lines:
        if (p, s) in by_speaker and len(line.split()) >= MIN_WORDS:
            by_speaker[(p, s)].append(line)
    rng = random.Random(SAMPLE_SEED)
    examples = []
    for (_, s), ls in by_speaker.items():
        for line in rng.sample(ls, min(per_speaker, len(ls))):
            examples.append({"prompt": speaker_prompt(line), "response": s})
    return examples


def speaker_task_dir() -> Path:
    return Path(tokens.DATA_ROOT) / "speaker_task"  # read at call time: tests point DATA_ROOT elsewhere
