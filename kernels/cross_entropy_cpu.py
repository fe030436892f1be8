"""Softmax cross-entropy of a chunk of logits and its gradient, in one pass per row: a small C kernel for the CPU.

nanoft/model/chunked_loss.py turns each chunk of logits z (rows, V) into every row's loss and, in the same
buffer, dL/dz. Per row r with target y and weight s (1/n for a counted row, 0 for an ignored one):

    m    = max_j z_j                    lse = m + log sum_j exp(z_j - m)
    loss = lse - z_y                    dz_j = s * (exp(z_j - m) / sum - [j == y])

`rows_reference` below writes that with PyTorch, one whole-tensor op at a time: at GPT-2's vocabulary
(V = 50304) each op is a pass through memory over the whole chunk (an upcast, the max, a subtraction, exp, the
sum, a division, the one-hot, the scale, a downcast: ~10 passes), and on a 2-core CPU they took ~45% of the
LM head's time, as long as its three matmuls (bench/bench_cross_entropy.py). The C kernel reads each row once
into a float32 buffer that stays in the core's cache (50304 floats: 200 KB), makes the three passes of the
formula there, and writes dz once, in the logits' own dtype (bfloat16 under autocast, where the matmuls that
use dz run): two trips through memory instead of ~10.

exp is glibc's vectorised expf (libmvec, within 4 ulp: the compiler calls its 16-wide AVX-512 form), so the
result is within a few float32 ulps of the reference, not bit for bit (tests/kernels/test_cross_entropy_cpu.py
bounds it against the reference and torch's F.cross_entropy). A row holding a NaN gets a NaN loss, as
torch's amax would give, so train.py's non-finite guard still sees it. Rows are split over torch's own OpenMP
threads (kernels/nf4_cpu.py says how). Without a C compiler (or glibc's libmvec) `available()` is False and the
reference runs.
"""
from __future__ import annotations

import ctypes
import warnings

import torch
from torch import Tensor

from ._cc import build_library

FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
PARALLEL_FROM = 1 << 18  # logits from which a call runs on every torch thread (OpenMP); below, one thread

C_SOURCE = f"#define PARALLEL_FROM {PARALLEL_FROM}\n" + r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's libmvec: with this declaration the compiler may call its vector forms (16 floats with AVX-512) */
__attribute__((simd("notinbranch"))) float expf(float);
float logf(float);

static float f32_from_f32(float v) { return v; }
static float f32_to_f32(float v) { return v; }
static float f32_from_bf16(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t f32_to_bf16(float f) { /* rounding to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* rows [first, last) of z (row-major, V per row), split over torch's OpenMP threads when there are enough;
   each thread has its own float32 buffer of one row */
#define ROWS(SUFFIX, T)                                                                                      \
    int xent_rows_##SUFFIX(T *z, const int64_t *targets, const float *scale, float *loss, int64_t V,        \
                           int64_t first, int64_t last, int grad) {                                         \
        int failed = 0;                                                                                    \
        _Pragma("omp parallel if ((last - first) * V >= PARALLEL_FROM) reduction(|:failed)")               \
        {                                                                                                  \
        float *buf = malloc(V * sizeof(float));                                                            \
        failed |= buf == NULL;                                                                             \
        _Pragma("omp for schedule(static)")                                                                \
        for (int64_t r = first; r < last; r++) {                                                           \
            if (buf == NULL) continue;                                                                     \
            T *row = z + r * V;                                                                            \
            float m = -__builtin_inff();                                                                   \
            int nan = 0;                                                                                   \
            _Pragma("omp simd reduction(max:m) reduction(|:nan)")                                          \
            for (int64_t j = 0; j < V; j++) {                                                              \
                float v = f32_from_##SUFFIX(row[j]);                                                       \
                buf[j] = v;                                                                                \
                m = v > m ? v : m;                                                                         \
                nan |= v != v;                                                                             \
            }                                                                                              \
            float sum = 0.0f;                                                                              \
            _Pragma("omp simd reduction(+:sum)")                                                           \
            for (int64_t j = 0; j < V; j++) {                                                              \
                buf[j] = expf(buf[j] - m);                                                                 \
                sum += buf[j];                                                                             \
            }                                                                                              \
            const int64_t y = targets[r];                                                                  \
            const float z_y = f32_from_##SUFFIX(row[y]);                                                   \
            loss[r] = nan ? __builtin_nanf("") : m + logf(sum) - z_y;                                      \
            if (!grad) continue;                                                                           \
            const float s = scale[r];                                                                      \
            for (int64_t j = 0; j < V; j++) row[j] = f32_to_##SUFFIX(buf[j] / sum * s);                    \
            row[y] = f32_to_##SUFFIX((buf[y] / sum - 1.0f) * s);                                           \
        }                                                                                                  \
        free(buf);                                                                                         \
        }                                                                                                  \
        return failed;                                                                                     \
    }
ROWS(f32, float)
ROWS(bf16, uint16_t)
"""

_LIBRARY: list = []  # [the loaded library, or None when it cannot be built]: built on first use


def _library() -> ctypes.CDLL | None:
    if not _LIBRARY:
        try:
            lib = build_library("xent_cpu_", C_SOURCE, FLAGS, link=("-lm",))
            for suffix in SUFFIX.values():
                kernel = getattr(lib, f"xent_rows_{suffix}")
                kernel.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                kernel.restype = ctypes.c_int
            _LIBRARY.append(lib)
        except (OSError, RuntimeError) as e:
            warnings.warn(f"nanoft: the CPU cross-entropy uses the slower PyTorch reference ({e})", stacklevel=3)
            _LIBRARY.append(None)
    return _LIBRARY[0]


def available() -> bool:
    """Whether the C kernel is built and loaded (building it on the first call)."""
    return _library() is not None


def supports(z: Tensor) -> bool:
    """Whether the C kernel takes these logits: a contiguous float32 or bfloat16 CPU matrix, and a library."""
    return z.device.type == "cpu" and z.dtype in SUFFIX and z.dim() == 2 and z.is_contiguous() and available()


def rows_cpu(z: Tensor, targets: Tensor, scale: Tensor, grad: bool) -> Tensor:
    """Each row's loss (float32 [rows]); with `grad`, z is overwritten by dL/dz (the module docstring).
    z (rows, V) contiguous float32 or bfloat16 on the CPU (`supports`), targets int64 in [0, V), scale float32."""
    targets = targets.to(torch.int64).contiguous()
    scale = scale.to(torch.float32).contiguous()
    if targets.shape != (z.size(0),) or scale.shape != (z.size(0),):
        raise ValueError(f"rows_cpu: targets and scale must be ({z.size(0)},), got {tuple(targets.shape)} and "
                         f"{tuple(scale.shape)}")
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < z.size(1):
        raise ValueError(f"rows_cpu: targets must be in [0, {z.size(1)})")  # C would read outside the row
    loss = torch.empty(z.size(0), dtype=torch.float32)
    kernel = getattr(_library(), f"xent_rows_{SUFFIX[z.dtype]}")
    if kernel(z.data_ptr(), targets.data_ptr(), scale.data_ptr(), loss.data_ptr(), z.size(1), 0, z.size(0), int(grad)):
        raise MemoryError(f"rows_cpu: no memory for a row buffer of {z.size(1)} floats")
    return loss


def rows_reference(z: Tensor, targets: Tensor, scale: Tensor, grad: bool) -> tuple[Tensor, Tensor | None]:
    """The readable specification: (each row's loss float32, dL/dz float32 or None), whole-tensor PyTorch ops.
    logsumexp by hand and in place (torch.logsumexp would allocate two more (rows, V) temporaries)."""
    z = z.float()  # a copy when z is bf16; otherwise z itself is overwritten
    y = targets.to(torch.int64).unsqueeze(1)
    z_y = z.gather(1, y)
    z_max = z.amax(dim=1, keepdim=True)
    sum_exp = z.sub_(z_max).exp_().sum(dim=1, keepdim=True)  # z is now exp(z - max)
    loss = (z_max + sum_exp.log() - z_y).squeeze(1)
    if not grad:
        return loss, None
    dz = z.div_(sum_exp)  # softmax
    dz.scatter_add_(1, y, torch.full_like(y, -1, dtype=dz.dtype))  # p - onehot(y)
    return loss, dz.mul_(scale.unsqueeze(1))
