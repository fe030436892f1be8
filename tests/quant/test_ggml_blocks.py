"""nanoft.quant.ggml_blocks: Q8_0 and Q4_0 blocks, byte for byte what llama.cpp's gguf package writes and reads."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from nanoft.quant.ggml_blocks import BLOCK, GGML_BLOCKS, bits_per_weight

GGML = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def random_rows(seed: int = 0) -> torch.Tensor:
    """(256, 1024) normal values, each row at its own scale from 1e-6 to 1e4: 8,192 blocks."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(256, 1024, generator=g) * torch.logspace(-6, 4, 256)[:, None]


def adversarial_blocks() -> torch.Tensor:
    """Blocks where a careless transcription goes wrong, one block (32 values) a row."""
    rows = []
    ramp = torch.arange(BLOCK, dtype=torch.float32)
    # codes exactly halfway: Q8_0 with d = 1 (max 127) at k + 0.5 (C's roundf goes away from zero, torch.round to
    # even); Q4_0 with d = 1 (m = -8): x + 8.5 an exact integer, and just below one
    rows.append(torch.cat([torch.tensor([127.0]), (ramp[1:] - 16) + 0.5]))
    rows.append(torch.cat([torch.tensor([-127.0]), -(ramp[1:] - 16) - 0.5]))
    rows.append(torch.cat([torch.tensor([-8.0]), (ramp[1:] - 16) / 2]))
    rows.append(torch.cat([torch.tensor([-8.0]), torch.nextafter((ramp[1:] - 16) / 2, torch.tensor(-1e9))]))
    # x * (1 / d) rounded to float32 lands on k - 0.5 where the exact product is just below it: two float32
    # roundings (ggml's C as written, and gguf.quants) give code k + 8, a fused multiply-add k + 7
    rows.append(torch.cat([torch.tensor([-11.643540382385254, -6.5494914054870605, -2.183164119720459,
                                         5.094048023223877, 6.549490451812744]), torch.zeros(BLOCK - 5)]))
    # ties for the largest magnitude: Q4_0 keeps the first one's sign
    rows.append(torch.cat([torch.tensor([3.0, -3.0]), torch.linspace(-2, 2, BLOCK - 2)]))
    rows.append(torch.cat([torch.tensor([-3.0, 3.0]), torch.linspace(-2, 2, BLOCK - 2)]))
    # the top code clips: the largest element negative, an opposite one of the same size
    rows.append(torch.cat([torch.tensor([-1.0, 1.0, 0.99, 0.9375]), torch.zeros(BLOCK - 4)]))
    # zeros: a whole block (d = 0: every code 0), negative zeros, a single non-zero
    rows.append(torch.zeros(BLOCK))
    rows.append(-torch.zeros(BLOCK))
    rows.append(torch.cat([torch.zeros(BLOCK - 1), torch.tensor([1e-3])]))
    # huge values (d past fp16's 65504: stored as inf, as ggml does) and tiny ones (d an fp16 subnormal, or 0)
    for scale in (1e30, 1e7, 65504 * 8, 1e-5, 1e-7, 1e-9, 1e-30):
        rows.append(torch.linspace(-1, 1, BLOCK) * scale)
    # fp16 rounding of d exactly halfway between two fp16 values (ties to even: down, then up)
    for d in (1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -14 * (1 + 2 ** -11)):
        rows.append(torch.cat([torch.tensor([-8 * d]), torch.linspace(-7 * d, 7 * d, BLOCK - 1)]))
        rows.append(torch.cat([torch.tensor([127 * d]), torch.linspace(-100 * d, 100 * d, BLOCK - 1)]))
    return torch.stack(rows).float()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy on a scale past fp16's range: inf
@pytest.mark.parametrize("name", GGML)
@pytest.mark.parametrize("data", ["random", "adversarial"])
def test_quantize_writes_the_bytes_gguf_quants_writes(name, data):
    x = random_rows() if data == "random" else adversarial_blocks()
    ours = GGML_BLOCKS[name].quantize(x)
    theirs = quantize(x.numpy(), GGML[name])
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
    assert ours.numel() == x.numel() // BLOCK * GGML_BLOCKS[name].block_bytes
    np.testing.assert_array_equal(ours.numpy(), theirs)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # inf * 0 = nan, on both sides
@pytest.mark.parametrize("name", GGML)
def test_dequantize_reads_any_bytes_as_gguf_quants_does(name):
    """Every byte pattern: random codes and random fp16 scales, inf and nan among them."""
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (128, 64 * GGML_BLOCKS[name].block_bytes), generator=g, dtype=torch.uint8)
    np.testing.assert_array_equal(GGML_BLOCKS[name].dequantize(data).numpy(), dequantize(data.numpy(), GGML[name]))


@pytest.mark.parametrize("name", GGML)
def test_round_trip_error_is_within_the_format_bound(name):
    """|x - read back| <= d / 2 a value (d the block's fp16 scale), but Q4_0's clipped top code: up to |d|, where
    an element of the opposite sign reaches the block's abs-max; plus what the fp16 rounding of d moves, <= 2^-11
    of the block's abs-max."""
    x = torch.randn(4096, BLOCK, generator=torch.Generator().manual_seed(2)) * 0.05  # fp16 scales all normal
    packed = GGML_BLOCKS[name].quantize(x)
    back = GGML_BLOCKS[name].dequantize(packed)
    amax = x.abs().amax(dim=1, keepdim=True)
    d = amax / (127 if name == "q8_0" else 8)
    bound = (d / 2 if name == "q8_0" else d) + amax * 2 ** -11
    assert ((x - back).abs() <= bound).all()
    if name == "q4_0":  # only the clipped top code may pass d / 2
        assert ((x - back).abs() <= d / 2 + amax * 2 ** -11)[x * back.sign() < 7.5 * d].all()


def test_rows_must_be_whole_blocks_and_bits_are_counted():
    with pytest.raises(ValueError, match="not whole blocks of 32"):
        GGML_BLOCKS["q8_0"].quantize(torch.ones(4, 48))
    assert (bits_per_weight("q8_0"), bits_per_weight("q4_0")) == (8.5, 4.5)
