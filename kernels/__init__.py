"""Triton kernels, each beside its plain-PyTorch reference. Installed and imported as `nanoft.kernels`."""
from .blockwise8 import dequantize_blockwise8, dynamic_map, quantize_blockwise8
from .nf4 import NF4State, dequantize_nf4, quantize_nf4

__all__ = ["NF4State", "dequantize_blockwise8", "dequantize_nf4", "dynamic_map", "quantize_blockwise8", "quantize_nf4"]
