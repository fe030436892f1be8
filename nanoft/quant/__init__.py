"""Quantized weights: one table from a format's name to its frozen Linear layer. NF4 (nf4.py: QLoRA's 4-bit
NormalFloat, bitsandbytes' layout) is the one format so far; each layer class quantizes an nn.Linear with
`from_linear` and holds a plain-PyTorch `dequantize` beside its fast path (nanoft.kernels)."""
from nanoft.quant.nf4 import Linear4bit, NF4Tensor

FORMATS = {
    "nf4": Linear4bit,  # 4-bit NormalFloat, double-quantized block scales (Dettmers et al. 2023): ~4.13 bits
}

__all__ = ["FORMATS", "Linear4bit", "NF4Tensor"]
