"""Progress on stderr: tqdm's bar on a terminal, a plain line every few seconds into a pipe or a file."""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from nanoft.run.progress import PlainProgress, progress

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^step (\d+)/(\d+) \(\d+%\)( \| .+)? \| [\d.]+ steps/s \| elapsed [\d:]+( \| ETA [\d:]+)?$")

LOOP = """
import sys, time
from nanoft.run.progress import progress
start = time.monotonic()
bar = progress(range(40), total=40, interval=0.25)
for step in bar:
    time.sleep(0.03)
    bar.set_postfix(loss=f"{5 - step / 10:.3f}", tok_s="1234")
    if step == 20:
        bar.write("step 20: a message")
bar.close()
print(time.monotonic() - start)
"""


def test_into_a_pipe_progress_is_whole_lines_at_most_one_per_interval():
    r = subprocess.run([sys.executable, "-c", LOOP], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b" not in r.stderr  # no redraws, no terminal escapes
    lines = r.stderr.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert lines[-1].startswith("step 40/40 (100%) | loss 1.100, tok_s 1234 | ")
    assert " | ETA " in lines[0]
    elapsed = float(r.stdout.splitlines()[-1])
    # a line only after `interval` seconds since the last one, plus the closing line
    assert 2 <= len(lines) <= elapsed / 0.25 + 1
    assert r.stdout.splitlines()[0] == "step 20: a message"  # write() goes to stdout, as tqdm.write does


def test_on_a_terminal_progress_is_tqdms_bar():
    main_fd, terminal_fd = os.openpty()  # a real pseudo-terminal: isatty() is true
    with os.fdopen(terminal_fd, "w") as terminal:
        bar = progress(range(3), total=3, file=terminal)
        assert isinstance(bar, tqdm)
        bar.close()
    os.close(main_fd)
    assert isinstance(progress(range(3), total=3, file=io.StringIO()), PlainProgress)


def test_a_disabled_bar_prints_nothing_and_a_resumed_one_counts_from_its_start():
    out = io.StringIO()
    bar = PlainProgress(range(5), total=5, disable=True, file=out)
    list(bar)
    bar.close()
    assert out.getvalue() == ""
    out = io.StringIO()
    bar = PlainProgress(range(7, 10), initial=7, total=10, interval=0.0, file=out)
    list(bar)
    bar.close()  # the last line already shows step 10: not printed twice
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == [
        "step 8/10 (80%)", "step 9/10 (90%)", "step 10/10 (100%)"]


def test_train_py_into_a_pipe_prints_plain_progress_lines_and_draws_loss_png(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "configs/tiny.py", f"--out_dir={tmp_path}", "--n_layer=2",
                        "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
                        "--max_iters=6", "--warmup_iters=2", "--eval_interval=3", "--log_interval=1", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr
    progress_lines = [line for line in r.stderr.splitlines() if LINE.match(line)]
    assert progress_lines and progress_lines[-1].startswith("step 6/6 (100%) | loss ")
    assert "tok_s " in progress_lines[-1]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records if "val_loss" in rec] == [3, 6]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "loss.png").exists()  # optional: silently skipped
    else:
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".loss.png.*"))  # no temporary file left behind
