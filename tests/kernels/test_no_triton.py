"""Without Triton (macOS and Windows have no wheels) nanoft still imports, trains and quantizes through
the PyTorch references; forcing backend="triton" is then a clear error."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError, as on a machine without it
sys.modules["triton.language"] = None
import pytest, torch
from nanoft.kernels import quantize_nf4, dequantize_nf4, quantize_blockwise8
from nanoft.optim import AdamW8bit
import train  # the loop's imports all resolve

torch.manual_seed(0)
x = torch.randn(4096)
q = quantize_nf4(x, double_quant=True)
err = (dequantize_nf4(q) - x).abs()
assert err.mean() < 0.1 and err.max() < 0.25 * x.abs().max(), (err.mean(), err.max())
p = torch.nn.Parameter(torch.randn(64, 128))
p.grad = torch.randn_like(p)
AdamW8bit([p], lr=1e-3).step()
with pytest.raises(RuntimeError, match="Triton is not installed"):
    quantize_blockwise8(x, backend="triton")
print("ok")
"""


def test_nanoft_works_without_triton():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
