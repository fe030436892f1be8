"""python -m nanoft plot OUT_DIR [OUT_DIR ...] [--to PNG]: train/val loss and lr of runs side by side, no wandb.

    python -m nanoft plot out/tiny                                   # -> out/tiny/loss.png
    python -m nanoft plot out/cmp_adamw out/cmp_adafactor --to out/loss.png

The drawing is nanoft/run/loss_plot.py's, which train.py also calls at each evaluation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoft.run.loss_plot import PLOT_NAME, draw


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dirs", nargs="+", help="train.py out_dirs, each holding a metrics.jsonl")
    p.add_argument("--to", help=f"the PNG to write (default: OUT_DIR/{PLOT_NAME} for one run; required for several)")
    args = p.parse_args(argv)
    if args.to is None and len(args.out_dirs) > 1:
        raise ValueError("several runs: name the picture with --to, e.g. --to out/loss.png")
    if not str(args.to or PLOT_NAME).lower().endswith(".png"):
        raise ValueError(f"--to must name a .png file; got {args.to}")
    try:
        print(draw(args.out_dirs, args.to or Path(args.out_dirs[0]) / PLOT_NAME))
    except ImportError:
        raise ValueError("drawing needs matplotlib: pip install nanoft[plot] (or pip install matplotlib)") from None


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
