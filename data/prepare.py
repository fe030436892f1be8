"""Prepare a dataset: text in, data/<name>/{train,val}.bin out (uint16 GPT-2 token ids).

    python data/prepare.py shakespeare                          # all of Shakespeare's plays, ~1.45M tokens
    python data/prepare.py --input 'notes/*.txt' --name mytext  # your own text files
    python data/prepare.py tinystories                          # a larger public corpus, over HTTP
    python data/prepare.py mycorpus --url https://example.org/corpus.txt [--sha256 HEX]

Downloads and the tokenizer are cached in data/.cache/ (set NANOFT_DATA to put data/ elsewhere).
The logic lives in nanoft/data/corpus.py; this file only parses the command line and reports what it wrote.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nanoft.data import corpus, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", help=f"shakespeare, a corpus ({', '.join(corpus.CORPORA)}), "
                                                   "or the name for --input/--url data")
    parser.add_argument("--input", help="glob of your own text files, quoted: 'notes/**/*.txt'")
    parser.add_argument("--name", help="dataset name for --input (same as the positional dataset)")
    parser.add_argument("--url", help="download this text file instead of the corpus's own (a mirror, or yours)")
    parser.add_argument("--sha256", help="expected sha256 of the --url download")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="share of tokens held out for val.bin (default 0.1 for --input, 0.01 for --url)")
    args = parser.parse_args(argv)
    name = args.name or args.dataset
    if name is None:
        parser.error("say which dataset: shakespeare, a corpus name, or --input GLOB --name NAME")

    start = time.perf_counter()
    try:
        if args.input:
            out = corpus.prepare_text_files(args.input, name, 0.1 if args.val_fraction is None else args.val_fraction)
        elif args.url or name in corpus.CORPORA:
            out = corpus.prepare_url(name, url=args.url, sha256=args.sha256, val_fraction=0.01 if args.val_fraction is None else args.val_fraction)
        elif name == "shakespeare":
            out = corpus.prepare_shakespeare()
        else:
            parser.error(f"unknown dataset {name!r}: use shakespeare, one of {sorted(corpus.CORPORA)}, "
                         "--input GLOB, or --url URL")
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    for split in ("train", "val"):
        path = Path(out) / f"{split}.bin"
        print(f"wrote {path}: {len(tokens.read_tokens(path)):,} tokens")
    baseline = tokens.unigram_entropy(Path(out) / "val.bin")
    print(f"val unigram baseline: {baseline:.3f} nats/token (a model that ignores context scores this)")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
