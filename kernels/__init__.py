"""Triton kernels, each beside its plain-PyTorch reference. Installed and imported as `nanoft.kernels`."""
from .blockwise8 import dequantize_blockwise8, dynamic_map, quantize_blockwise8

__all__ = ["dynamic_map", "quantize_blockwise8", "dequantize_blockwise8"]
