"""kernels/nf4_cpu.py, the C kernel that backend="auto" runs on the CPU: bit for bit the PyTorch reference.

tests/kernels/test_nf4_kernels.py also runs "auto" through its whole matrix against bitsandbytes; here: tensors large enough
to be split across threads, values at the edges of the output formats, and the build (cache, broken compiler).
"""
import shutil

import pytest
import torch
from helpers import torch_threads

from nanoft.kernels import dequantize_nf4, nf4_cpu, quantize_nf4
from nanoft.kernels.nf4 import NF4_VALUES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FIELDS = ("packed", "absmax", "offset", "nested_absmax")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def assert_kernel_equals_reference(x: torch.Tensor, blocksize: int, double_quant: bool):
    ref = quantize_nf4(x, blocksize, double_quant, backend="torch")
    fast = quantize_nf4(x, blocksize, double_quant, backend="auto")
    for name in FIELDS:
        if getattr(ref, name) is not None:
            assert same_bits(getattr(fast, name), getattr(ref, name)), name
    for dtype in DTYPES:
        assert same_bits(dequantize_nf4(ref, dtype, backend="auto"), dequantize_nf4(ref, dtype, backend="torch")), dtype


@pytest.fixture
def two_threads():
    """The kernel splits a large tensor between torch's threads: make sure there are two, even on one core."""
    with torch_threads(2):
        yield


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_the_c_kernel_builds_where_there_is_a_compiler():
    assert nf4_cpu.available()  # else every other test here would compare the reference with itself


def test_large_tensor_split_across_threads_equals_reference(two_threads):
    torch.manual_seed(0)
    x = torch.randn(1031, 2049) * 0.02  # 2.1M elements: two threads; odd numel, a short last block
    assert x.numel() > 2 * nf4_cpu.PARALLEL_FROM and x.numel() % 64
    for dtype in DTYPES:
        assert_kernel_equals_reference(x.to(dtype), 64, double_quant=dtype != torch.float16)


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_edge_values_equal_reference(blocksize):
    """Blocks whose products land in float16/bfloat16 subnormals or overflow float16, all-zero blocks, negative
    zeros, exact midpoints and +-absmax, in every input dtype that holds them and every output dtype."""
    torch.manual_seed(1)
    nf4 = torch.tensor(NF4_VALUES)
    mids = (nf4[:-1] + nf4[1:]) / 2
    row = torch.cat([mids, -mids, nf4, torch.tensor([-0.0, 0.0, 1e-30, -1e-30])])  # 50 values in [-1, 1]
    values = torch.cat([row, torch.rand(max(0, blocksize - row.numel())) * 2 - 1])[:blocksize]
    scales = [1.0, 1e-38, 3e-39, 1e-30, 7e-6, 6e4, 1e5, 3e38, 0.0]  # tiny, fp16-subnormal, fp16-overflowing, zero
    # absmax exactly halfway between two bfloat16 (0x...8000) or float16 values: +-absmax itself is an output,
    # so rounding to nearest *even* is tested (float32 input only; narrower inputs cannot hold these)
    scales += torch.tensor([0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000], dtype=torch.int32).view(torch.float32).tolist()
    blocks = [values[torch.randperm(blocksize)] * s for s in scales]
    for dtype in DTYPES:
        x = torch.cat([b.to(dtype) for b in blocks if torch.isfinite(b.to(dtype)).all()])
        x[-3:] = -0.0
        assert_kernel_equals_reference(x, blocksize, double_quant=dtype == torch.float32)


def test_nan_or_inf_anywhere_is_refused_by_the_kernel_path():
    x = torch.randn(4, 640)
    for position in (0, 1000, 2559):  # first block, middle, the last element
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y.view(-1)[position] = bad
            with pytest.raises(ValueError, match="NaN or inf"):
                quantize_nf4(y, 64, backend="auto")


def test_builds_into_its_cache_and_a_broken_compiler_falls_back_to_the_reference(tmp_path, monkeypatch):
    x = torch.randn(16, 64)
    expected = quantize_nf4(x, 64, True, backend="torch")
    monkeypatch.setattr(nf4_cpu, "_LIBRARY", [])  # forget the loaded library: build again, here
    monkeypatch.setenv("NANOFT_CACHE", str(tmp_path / "good"))
    if shutil.which("cc") or shutil.which("gcc"):
        assert nf4_cpu.available()
        assert len(list((tmp_path / "good").glob("nf4_cpu_*.so"))) == 1
    monkeypatch.setattr(nf4_cpu, "_LIBRARY", [])
    monkeypatch.setenv("NANOFT_CACHE", str(tmp_path / "broken"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.warns(UserWarning, match="slower PyTorch reference.*false failed"):
        q = quantize_nf4(x, 64, True)
    assert not nf4_cpu.available()
    for name in FIELDS:
        assert same_bits(getattr(q, name), getattr(expected, name)), name
    assert same_bits(dequantize_nf4(q), dequantize_nf4(expected, backend="torch"))


def test_portable_c_without_avx512_equals_reference(tmp_path, monkeypatch):
    """The plain-C loops a CPU without AVX-512 runs (built here without -march=native)."""
    monkeypatch.setattr(nf4_cpu, "_LIBRARY", [])
    monkeypatch.setattr(nf4_cpu, "FLAGS", [f for f in nf4_cpu.FLAGS if f != "-march=native"])
    monkeypatch.setenv("NANOFT_CACHE", str(tmp_path))
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    assert nf4_cpu.available()  # a portable build that fails to load must fail here, not fall back quietly
    for blocksize in (32, 4096):
        test_edge_values_equal_reference(blocksize)
    torch.manual_seed(2)
    assert_kernel_equals_reference((torch.randn(300, 333) * 0.02).bfloat16(), 64, True)
