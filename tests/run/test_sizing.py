"""The notices before a long run: sized for a GPU (and then the time measured here), a schedule inside its warmup."""
import time

from nanoft.config import Config
from nanoft.run.sizing import GPU_SIZED_SECONDS, GpuSizedNotice, warmup_notice


def test_only_a_cpu_run_beyond_an_hour_at_peak_speed_gets_the_gpu_notice():
    peak = 4e11  # FLOP/s
    assert GpuSizedNotice("cpu", 2 * GPU_SIZED_SECONDS * peak, peak, "configs/100m.py").active
    assert not GpuSizedNotice("cpu", 0.5 * GPU_SIZED_SECONDS * peak, peak, "configs/tiny.py").active
    assert not GpuSizedNotice("cuda", 100 * GPU_SIZED_SECONDS * peak, peak, "configs/100m.py").active


def test_the_estimate_leaves_out_the_first_step_and_is_said_once():
    notice = GpuSizedNotice("cpu", 36 * GPU_SIZED_SECONDS * 1e12, 1e12, "configs/100m.py")
    assert "at least 36.0 h" in notice.opening() and "configs/tiny.py trains in minutes" in notice.opening()
    time.sleep(0.3)  # the first step: start-up, not timed
    assert notice.step_done(1, 301) is None
    time.sleep(0.1)
    assert notice.step_done(2, 301) is None
    time.sleep(0.1)
    line = notice.step_done(3, 301)
    per_step = float(line.split("measured: ")[1].split(" s")[0])
    assert 0.1 <= per_step < 0.25 and "the remaining 298 steps take about" in line
    assert notice.step_done(4, 301) is None and not notice.active


def test_warmup_notice_only_for_a_run_that_ends_inside_its_warmup():
    assert warmup_notice(Config(max_iters=100, warmup_iters=100)) is None
    note = warmup_notice(Config(max_iters=8, warmup_iters=30, lr=2e-3, min_lr=2e-4))
    assert note.endswith("the learning rate rises to 5.16e-04, not to its peak lr=2.00e-03")  # 2e-3 * 8 / 31
