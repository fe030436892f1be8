"""Loss curves without wandb: train and validation loss, and the learning rate, of one or several runs in a PNG.

    refresh_plot(out_dir)            # train.py, at each evaluation: out_dir/loss.png
    python -m nanoft plot out/tiny out/try --to out/loss.png         # the command (nanoft/tools/plot.py)

Each run is an out_dir; its curve comes from out_dir/metrics.jsonl (train.py appends one JSON object per
logged step: step, loss, lr, and val_loss at an evaluation). A step logged twice (a run resumed from an
earlier checkpoint logs the steps after it again) counts once, with its last record. train.py redraws
out_dir/loss.png at each evaluation when matplotlib is installed (`pip install nanoft[plot]`).

matplotlib is an optional extra, so it is imported inside `draw`, not at the top: the training loop imports
this module and must run without it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FIGSIZE, DPI = (9.0, 6.0), 100  # inches and dots per inch: a 900 x 600 pixel PNG
PLOT_NAME = "loss.png"


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The run's records sorted by step, the last record of a step winning."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {out_dir} a train.py out_dir?")
    by_step = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {n}: not a metrics record (a JSON object with a step)") from None
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric; steps where it is missing or null are left out."""
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def draw(out_dirs: list[str | Path], to: str | Path) -> Path:
    """Draw the runs' curves into the PNG `to`, written atomically (a reader never sees half an image)."""
    runs = [(Path(d).name or str(d), read_metrics(d)) for d in out_dirs]  # every file read before anything is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no GUI, no global figure state
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for i, (name, records) in enumerate(runs):
        color = f"C{i % 10}"  # one colour per run: solid train loss, dots on the dashed validation loss
        width = 1.5 + 1.5 * (len(runs) - 1 - i)  # earlier runs drawn wider: where curves coincide, each stays visible
        loss_ax.plot(*_series(records, "loss"), color=color, linewidth=width, label=f"{name} train")
        loss_ax.plot(*_series(records, "val_loss"), color=color, linestyle="--", marker="o", label=f"{name} val")
        lr_ax.plot(*_series(records, "lr"), color=color, linewidth=width, label=name)
    loss_ax.set_ylabel("loss (cross-entropy, nats)")
    loss_ax.set_title("train and validation loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp")  # per process: two writers never share a temporary file
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, to)  # atomic on POSIX and Windows: the old picture or the new one, never a mix
    finally:
        tmp.unlink(missing_ok=True)
    return to


def refresh_plot(out_dir: str | Path) -> None:
    """train.py's call at each evaluation: redraw out_dir/loss.png. Skipped silently without matplotlib;
    any other failure is one line on stderr, never the end of the training run."""
    try:
        draw([out_dir], Path(out_dir) / PLOT_NAME)
    except ImportError:
        pass  # matplotlib is optional: pip install nanoft[plot]
    except Exception as e:  # noqa: BLE001 (a picture is never worth a training run)
        print(f"warning: could not draw {Path(out_dir) / PLOT_NAME}: {e}", file=sys.stderr)
