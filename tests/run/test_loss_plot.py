"""python -m nanoft plot: loss and learning-rate curves of train.py out_dirs in a PNG, without wandb."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nanoft.run import loss_plot as plot
from nanoft.tools.plot import main as plot_main

ROOT = Path(__file__).resolve().parents[2]


def write_run(out_dir: Path, steps: int = 30, eval_every: int = 10, start_loss: float = 6.0) -> Path:
    out_dir.mkdir(parents=True)
    with open(out_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            record = {"step": step, "loss": start_loss / step ** 0.3, "lr": 1e-3 * min(1, step / 5)}
            if step % eval_every == 0:
                record["val_loss"] = record["loss"] + 0.1
            f.write(json.dumps(record) + "\n")
    return out_dir


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's header chunk (IHDR), after the 8-byte signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_read_metrics_keeps_the_last_record_of_a_step_logged_twice(tmp_path):
    run = write_run(tmp_path / "run", steps=4)
    with open(run / "metrics.jsonl", "a") as f:  # resumed from step 2: steps 3 and 4 logged again
        f.write(json.dumps({"step": 3, "loss": 0.5, "lr": 1e-4}) + "\n")
    records = plot.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["loss"] == 0.5


def test_two_runs_are_drawn_into_a_valid_png_of_the_expected_size(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    a, b = write_run(tmp_path / "adamw"), write_run(tmp_path / "adafactor", start_loss=7.0)
    r = subprocess.run([sys.executable, "-m", "nanoft", "plot", str(a), str(b), "--to", str(tmp_path / "cmp" / "loss.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    to = tmp_path / "cmp" / "loss.png"
    assert r.stdout.strip() == str(to)
    width, height = plot.FIGSIZE[0] * plot.DPI, plot.FIGSIZE[1] * plot.DPI
    assert png_size(to) == (width, height)
    pixels = image.imread(to)  # decodes: a whole image, not just a header
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05  # curves and text, not a blank canvas
    assert sorted(p.name for p in to.parent.iterdir()) == ["loss.png"]  # the temporary file was renamed


def test_one_run_defaults_to_its_own_loss_png(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run")
    plot_main([str(run)])
    assert png_size(run / "loss.png") == (plot.FIGSIZE[0] * plot.DPI, plot.FIGSIZE[1] * plot.DPI)


@pytest.mark.parametrize("args, message", [
    (["{a}", "{b}"], "error: several runs: name the picture with --to, e.g. --to out/loss.png"),
    (["{a}", "--to", "{tmp}/loss.jpg"], "error: --to must name a .png file; got {tmp}/loss.jpg"),
    (["{tmp}/missing", "--to", "{tmp}/x.png"], "error: {tmp}/missing/metrics.jsonl does not exist: is {tmp}/missing a train.py out_dir?"),
    (["{bad}", "--to", "{tmp}/x.png"], "error: {bad}/metrics.jsonl, line 2: not a metrics record (a JSON object with a step)"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    bad = write_run(tmp_path / "bad", steps=1)
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"loss": 1.0}\n')
    fill = {"a": a, "b": b, "bad": bad, "tmp": tmp_path}
    r = subprocess.run([sys.executable, "-m", "nanoft", "plot", *(x.format(**fill) for x in args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip() == message.format(**fill)
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.tmp"))


def test_refresh_without_matplotlib_is_silently_skipped(tmp_path):
    run = write_run(tmp_path / "run")
    code = ("import sys; sys.modules['matplotlib'] = None  # as if not installed: importing it raises ImportError\n"
            f"from nanoft.run import loss_plot; loss_plot.refresh_plot({str(run)!r}); print('trained on')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, "trained on\n", "")
    assert not (run / "loss.png").exists()


def test_refresh_never_fails_the_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text("not json\n")
    plot.refresh_plot(run)  # returns: a picture is never worth a training run
    assert capsys.readouterr().err == (f"warning: could not draw {run / 'loss.png'}: "
                                       f"{run / 'metrics.jsonl'}, line 1: not a metrics record (a JSON object with a step)\n")
    assert not list(run.glob("*.png")) and not list(run.glob(".*tmp"))
