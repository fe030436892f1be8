"""NF4 quantize and dequantize on the CPU: kernels/nf4.py's reference, as a small C kernel.

Same inputs, same bytes out: tests/kernels/test_nf4_kernels.py and tests/kernels/test_nf4_cpu.py hold it to the reference and to
bitsandbytes. Why C: the reference is several whole-tensor PyTorch ops (a gather, a multiply, a cast, each
through fresh memory), and the PyTorch reformulations we measured stayed 2-5x behind bitsandbytes' C++ kernel
(chunked through cache-sized buffers: still ~0.6 ns of dispatch and gather per element, against ~0.1), while
torch.compile (inductor's CPU backend) compiled for 25-45 s and emitted scalar code for the 16-entry lookup
(bench/NOTES_nf4.md). What a CPU does well here is what the Triton kernel does on a GPU: one pass over the
bytes, the 16 NF4 values of a block in a register.

Dequantize, per block of `blocksize` elements with float32 absmax `a`:

    table[k] = NF4[k] * a            16 float32 products: every output of the block is one of them
    out[2j]  = table[byte_j >> 4]    element 2j sits in the high nibble of packed byte j
    out[2j+1] = table[byte_j & 15]   rounded once to the output dtype (nearest even), as `.to(dtype)` does

With AVX-512 (compiled for this CPU with -march=native) 16 bytes become 32 outputs in a few instructions:
`vpermps` looks up 16 nibbles in the 16-entry table held in one register, and `vpermt2ps` interleaves the
high and low nibbles' values. Without it, the same loop in plain C.

Quantize, per block (as bitsandbytes' CPU path): absmax = max |x|, y = clamp(x * (1 / max(absmax, floor)),
-1, 1), code = #{NF4 midpoints < y} (15 compares), two codes per byte. Only whole blocks come here: a short
last block goes through the reference, which knows bitsandbytes' rules for it.

Around them: double quantization's absmax is rebuilt by one C loop (torch's small parallel ops cost more in
spinning threads than the work), and a dequantize output of 8 MB or more asks Linux for 2 MB pages, because
a fresh output's first-touch page faults cost more than the arithmetic (advise_huge_pages).

The C source below is compiled once per machine with the system C compiler (kernels/_cc.py) and loaded with
ctypes. Without a working compiler `available()` is False and nanoft uses the reference (with one warning).
A call of PARALLEL_FROM elements or more splits its blocks over torch's own threads: the library is built with
OpenMP, and the loader gives it the OpenMP runtime torch has already loaded (libgomp.so.1), so those are torch's
threads, as many as torch.get_num_threads(), already awake after torch's last parallel op (bitsandbytes' CPU
kernels share them the same way). Python threads woke a millisecond or two late on a busy machine, as long
as a whole call. A compiler without OpenMP builds it without (kernels/_cc.py): one thread.
"""
import ctypes
import warnings

import torch
from torch import Tensor

from ._cc import build_library

PARALLEL_FROM = 1 << 18  # elements from which a call runs on every torch thread (OpenMP); below, one thread
HUGE_PAGES_FROM = 8 << 20  # output bytes from which dequantize asks for 2 MB pages (see advise_huge_pages)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]  # no FMA: each product rounded alone
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

C_SOURCE = f"#define PARALLEL_FROM {PARALLEL_FROM}\n" + r"""
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* float32 -> bfloat16 bits, rounding to nearest even (torch's rule; a NaN becomes 0x7fc0) */
static uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static float bf16_value(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A block's absmax: stored as float32, or (double quantization: codes != NULL) rebuilt from its 8-bit code,
   code[codes[b]] * nested[b / nested_blocksize] + offset, each step rounded to float32 as the reference does */
static inline float block_absmax(const float *absmax, const uint8_t *codes, const float *nested, const float *code,
                                 float offset, int64_t nested_blocksize, int64_t b) {
    if (codes == NULL) return absmax[b];
    float scaled = code[codes[b]] * nested[b / nested_blocksize];
    return scaled + offset;
}
#define ABSMAX(b) block_absmax(absmax, codes, nested, code, offset, nested_blocksize, (b))

#ifdef __AVX512F__
static __m512i bf16_bits16(__m512 v) { /* bf16_bits on 16 floats at once */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
}
#define STORE_f32(o, v) _mm512_storeu_ps((o), (v))
#define STORE_f16(o, v) \
    _mm256_storeu_si256((__m256i *)(o), _mm512_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define STORE_bf16(o, v) _mm256_storeu_si256((__m256i *)(o), _mm512_cvtepi32_epi16(bf16_bits16(v)))

/* blocks [first, last); blocksize / 2 is a multiple of 16 (blocksize >= 32) */
#define DEQUANTIZE(SUFFIX, T, CONVERT)                                                                       \
    void dequantize_##SUFFIX(const uint8_t *packed, const float *absmax, const uint8_t *codes,             \
                             const float *nested, const float *code, float offset, int64_t nested_blocksize,\
                             const float *nf4, T *out, int64_t blocksize, int64_t first, int64_t last) {    \
        const __m512i even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);     \
        const __m512i odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);\
        const __m512 values = _mm512_loadu_ps(nf4);                                                        \
        _Pragma("omp parallel for schedule(static) if ((last - first) * blocksize >= PARALLEL_FROM)")      \
        for (int64_t b = first; b < last; b++) {                                                           \
            const __m512 table = _mm512_mul_ps(values, _mm512_set1_ps(ABSMAX(b)));                         \
            const uint8_t *p = packed + b * (blocksize / 2);                                               \
            T *o = out + b * blocksize;                                                                    \
            for (int64_t j = 0; j < blocksize / 2; j += 16) {                                              \
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j)));           \
                __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);                   \
                __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), table); \
                STORE_##SUFFIX(o + 2 * j, _mm512_permutex2var_ps(high, even, low));                        \
                STORE_##SUFFIX(o + 2 * j + 16, _mm512_permutex2var_ps(high, odd, low));                    \
            }                                                                                              \
        }                                                                                                  \
    }
#else
#define DEQUANTIZE(SUFFIX, T, CONVERT)                                                                       \
    void dequantize_##SUFFIX(const uint8_t *packed, const float *absmax, const uint8_t *codes,             \
                             const float *nested, const float *code, float offset, int64_t nested_blocksize,\
                             const float *nf4, T *out, int64_t blocksize, int64_t first, int64_t last) {    \
        _Pragma("omp parallel for schedule(static) if ((last - first) * blocksize >= PARALLEL_FROM)")      \
        for (int64_t b = first; b < last; b++) {                                                           \
            T table[16];                                                                                   \
            for (int k = 0; k < 16; k++) table[k] = CONVERT(nf4[k] * ABSMAX(b));                           \
            const uint8_t *p = packed + b * (blocksize / 2);                                               \
            T *o = out + b * blocksize;                                                                    \
            for (int64_t j = 0; j < blocksize / 2; j++) {                                                  \
                o[2 * j] = table[p[j] >> 4];                                                               \
                o[2 * j + 1] = table[p[j] & 15];                                                           \
            }                                                                                              \
        }                                                                                                  \
    }
#endif
DEQUANTIZE(f32, float, (float))
DEQUANTIZE(f16, _Float16, (_Float16))
DEQUANTIZE(bf16, uint16_t, bf16_bits)

/* Double quantization: absmax[b] = code[q[b]] * nested[b / nested_blocksize] + offset, each step rounded to
   float32 (the reference: kernels/blockwise8.py's dequantize, then + offset) */
void double_quant_absmax(const uint8_t *q, const float *nested, const float *code, float offset, float *absmax,
                         int64_t nested_blocksize, int64_t num_blocks) {
    for (int64_t b = 0; b < num_blocks; b++) {
        float scaled = code[q[b]] * nested[b / nested_blocksize];
        absmax[b] = scaled + offset;
    }
}

/* A fresh output of many MB costs a page fault per 4 KB page on its first write, more than the arithmetic;
   asking Linux for 2 MB pages there (what torch does for all memory with THP_MEM_ALLOC_ENABLE=1) makes the
   faults 512x fewer. Only a hint: the memory and its contents are unchanged. */
void advise_huge_pages(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1), end = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (end > start) madvise((void *)start, end - start, MADV_HUGEPAGE);
#endif
}

/* blocks [first, last). absmax is NaN if the block holds a NaN (the caller rejects it), inf for an inf */
#define QUANTIZE(SUFFIX, T, TO_FLOAT)                                                                        \
    void quantize_##SUFFIX(const T *x, const float *midpoints, float floor, uint8_t *packed, float *absmax,  \
                           int64_t blocksize, int64_t first, int64_t last) {                                \
        float mid[15];                                                                                     \
        memcpy(mid, midpoints, sizeof(mid)); /* a local copy: the compiler may keep it in registers */    \
        _Pragma("omp parallel for schedule(static) if ((last - first) * blocksize >= PARALLEL_FROM)")      \
        for (int64_t b = first; b < last; b++) {                                                           \
            float y[4096], m = 0.0f; /* each thread's own: declared in the loop */                         \
            uint8_t code[4096];                                                                            \
            int nan = 0;                                                                                   \
            for (int64_t i = 0; i < blocksize; i++) {                                                      \
                y[i] = TO_FLOAT(x[b * blocksize + i]);                                                     \
                float a = y[i] < 0.0f ? -y[i] : y[i];                                                      \
                m = a > m ? a : m;                                                                         \
                nan |= y[i] != y[i];                                                                       \
            }                                                                                              \
            absmax[b] = nan ? __builtin_nanf("") : m;                                                      \
            const float inv = 1.0f / (m > floor ? m : floor);                                              \
            for (int64_t i = 0; i < blocksize; i++) {                                                      \
                float v = y[i] * inv;                                                                      \
                v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);                                             \
                uint8_t c = 0;                                                                             \
                for (int k = 0; k < 15; k++) c += v > mid[k];                                              \
                code[i] = c;                                                                               \
            }                                                                                              \
            for (int64_t j = 0; j < blocksize / 2; j++)                                                    \
                packed[b * (blocksize / 2) + j] = (uint8_t)(code[2 * j] << 4 | code[2 * j + 1]);           \
        }                                                                                                  \
    }
QUANTIZE(f32, float, (float))
QUANTIZE(f16, _Float16, (float))
QUANTIZE(bf16, uint16_t, bf16_value)
"""

_LIBRARY: list = []  # [the loaded library, or None when it cannot be built]: built on first use


def _build() -> ctypes.CDLL:
    lib = build_library("nf4_cpu_", C_SOURCE, FLAGS)
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for suffix in SUFFIX.values():
        getattr(lib, f"dequantize_{suffix}").argtypes = [pointer] * 5 + [ctypes.c_float, size, pointer, pointer] + [size] * 3
        getattr(lib, f"quantize_{suffix}").argtypes = [pointer, pointer, ctypes.c_float, pointer, pointer] + [size] * 3
    lib.double_quant_absmax.argtypes = [pointer] * 3 + [ctypes.c_float, pointer, size, size]
    lib.advise_huge_pages.argtypes = [pointer, size]
    return lib


def _library() -> ctypes.CDLL | None:
    if not _LIBRARY:
        try:
            _LIBRARY.append(_build())
        except (OSError, RuntimeError) as e:
            warnings.warn(f"nanoft: NF4 on the CPU uses the slower PyTorch reference ({e})", stacklevel=3)
            _LIBRARY.append(None)
    return _LIBRARY[0]


def available() -> bool:
    """Whether the C kernel is built and loaded (building it on the first call)."""
    return _library() is not None


def quantize_nf4_cpu(flat: Tensor, blocksize: int, midpoints: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """The whole blocks of `flat` (1-D, contiguous): (packed uint8 [blocks * blocksize / 2], absmax float32
    [blocks]), as the reference computes them; an absmax is NaN or inf where its block holds one."""
    num_blocks = flat.numel() // blocksize
    packed = torch.empty(num_blocks * blocksize // 2, dtype=torch.uint8)
    absmax = torch.empty(num_blocks, dtype=torch.float32)
    kernel = getattr(_library(), f"quantize_{SUFFIX[flat.dtype]}")
    args = (flat.data_ptr(), midpoints.data_ptr(), floor, packed.data_ptr(), absmax.data_ptr(), blocksize)
    kernel(*args, 0, num_blocks)
    return packed, absmax


def dequantize_nf4_cpu(packed: Tensor, absmax: Tensor, blocksize: int, nf4: Tensor, out: Tensor,
                       double_quant: tuple[Tensor, Tensor, Tensor, int] | None = None) -> None:
    """out[: blocks * blocksize] (1-D, contiguous) = NF4[code] * absmax[block], rounded once to out's dtype, for
    the whole blocks of `packed` (uint8, contiguous). absmax: float32 (contiguous), or with `double_quant` =
    (nested_absmax, the 256-entry code, offset, nested_blocksize) its uint8 codes, each block's absmax rebuilt
    in the same pass (double_quant_absmax's formula)."""
    if not (packed.numel() * 2 >= absmax.numel() * blocksize <= out.numel() and out.is_contiguous()):
        raise ValueError("dequantize_nf4_cpu: packed or out is smaller than the blocks of absmax")  # C would overrun
    lib = _library()
    if out.numel() * out.element_size() >= HUGE_PAGES_FROM:
        lib.advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    if double_quant is None:
        stats = (absmax.data_ptr(), None, None, None, 0.0, 1)
    else:
        nested, code, offset, nested_blocksize = double_quant
        if nested.numel() * nested_blocksize < absmax.numel() or code.numel() != 256:
            raise ValueError("dequantize_nf4_cpu: nested_absmax or code is too small for the blocks")
        stats = (None, absmax.data_ptr(), nested.data_ptr(), code.data_ptr(), offset, nested_blocksize)
    getattr(lib, f"dequantize_{SUFFIX[out.dtype]}")(packed.data_ptr(), *stats, nf4.data_ptr(), out.data_ptr(),
                                                     blocksize, 0, absmax.numel())


def double_quant_absmax(codes: Tensor, nested_absmax: Tensor, code: Tensor, offset: Tensor, nested_blocksize: int
                        ) -> Tensor:
    """The float32 absmax of a double-quantized state (uint8 `codes`, float32 `nested_absmax` and 256-entry `code`,
    all contiguous): code[codes[b]] * nested_absmax[b // nested_blocksize] + offset."""
    absmax = torch.empty(codes.numel(), dtype=torch.float32)
    _library().double_quant_absmax(codes.data_ptr(), nested_absmax.data_ptr(), code.data_ptr(), offset.item(),
                                   absmax.data_ptr(), nested_blocksize, codes.numel())
    return absmax
