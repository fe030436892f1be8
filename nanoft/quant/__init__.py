"""Quantized weights: one table from a format's name to its frozen Linear layer. Each class is built empty as
`cls(in_features, out_features, bias, **params)` and filled by load_state_dict (or made from an nn.Linear), and
holds a plain-PyTorch `dequantize` beside its fast path.

    nf4    nf4.py         QLoRA's 4-bit NormalFloat (bitsandbytes' layout): QLoRA's frozen base, and a weight-only PTQ
    int8   int_linear.py  symmetric per-channel INT8 (RTN or GPTQ codes)
    int4   int_linear.py  asymmetric group-wise INT4 (RTN, GPTQ or AWQ codes)

The post-training methods that choose the codes: round to nearest (int_linear.rtn), GPTQ (gptq.py), AWQ (awq.py).
"""
from nanoft.quant.int_linear import Int4Linear, Int8Linear
from nanoft.quant.nf4 import Linear4bit, NF4Tensor

FORMATS = {
    "nf4": Linear4bit,  # 4-bit NormalFloat, double-quantized block scales (Dettmers et al. 2023): ~4.13 bits
    "int8": Int8Linear,  # int8 codes, a float32 scale per output row: ~8 bits
    "int4": Int4Linear,  # int4 codes, a float32 scale and a 4-bit zero per group: 4 + 40 / group_size bits
}

__all__ = ["FORMATS", "Int4Linear", "Int8Linear", "Linear4bit", "NF4Tensor"]
