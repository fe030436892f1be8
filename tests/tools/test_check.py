"""python -m nanoft check, as a user runs it: on this CPU-only machine its kernel part runs Triton through the
interpreter against the PyTorch references, and bitsandbytes' quantizer; the training part is left to its
own runs (seven train.py runs are minutes on 2 cores)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_self_check_kernels_and_bandwidth_pass_and_print_their_tables():
    r = subprocess.run([sys.executable, "-m", "nanoft", "check", "--skip-training"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    assert "all checks passed" in out and "MISMATCH" not in out
    kernels = [line for line in out.splitlines() if line.rstrip().endswith(" ok")]
    assert len(kernels) == 22  # NF4 x 3 dtypes x dq on/off x (quantize, dequantize), blockwise8 x 6, adamw8bit x 2, bnb x 2
    assert "device-to-device copy (ceiling)" in out and "nanoft PyTorch reference" in out


def test_self_check_refuses_too_few_steps():
    r = subprocess.run([sys.executable, "-m", "nanoft", "check", "--steps=2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--steps must be at least 4, got 2" in r.stderr
