"""Triton, or a stand-in where it can't be installed (macOS, Windows: no wheels).

Every kernel here has a plain-PyTorch reference, and backend="auto" picks it off CUDA or without Triton
(`use_triton`, the one place that decides), so a machine without Triton loses nothing but the option to
force backend="triton". The stand-in lets the kernel files import, and launching a kernel through it
is a clear error instead of an ImportError at `import nanoft`.
"""
import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # only the names used when a kernel file is imported are provided
    class _Unavailable:
        def __init__(self, fn):
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise RuntimeError(f"Triton is not installed: cannot launch {self.__name__}; use backend='torch'")

        __call__ = __getitem__

    class triton:
        @staticmethod
        def jit(fn=None, **_):
            return _Unavailable(fn) if fn is not None else _Unavailable

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    class tl:
        constexpr = int

    AVAILABLE = False


def use_triton(backend: str, device: torch.device) -> bool:
    """The one backend policy: "triton" forces the kernel, "torch" the reference, and "auto" takes the
    kernel only on CUDA and only when Triton is really there (a CUDA machine without it, e.g. Windows,
    keeps working through the reference; forcing "triton" there is the stand-in's clear error)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f'backend must be "auto", "triton" or "torch", got {backend!r}')
    return backend == "triton" or (backend == "auto" and device.type == "cuda" and AVAILABLE)


__all__ = ["AVAILABLE", "tl", "triton", "use_triton"]
