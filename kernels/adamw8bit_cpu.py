"""The 8-bit AdamW update on the CPU: adamw8bit.py's reference, written as one loop in C.

Why C: the reference is ~30 whole-tensor torch ops (dequantize, the update, the block maxima, the lookup-grid
quantization), each a full pass over memory with float32 temporaries: ~50 ns per element on this 2-core CPU,
20x torch.optim.AdamW. Here each 256-value block is dequantized, updated and requantized while it sits in
registers and L1, and the states cross memory once, as bytes. It is the same loop as the Triton kernel in
adamw8bit.py; Triton has no CPU backend, and torch.compile's C++ cannot say "fused multiply-add here and nowhere
else", which bit-exactness with torch's eager CPU ops (and so with bitsandbytes) needs.

Every operation is the reference's, in float32, in the reference's order: the two fmaf calls are the two places
where torch's CPU kernels fuse (add_ with alpha, addcmul_), and the file is compiled with -ffp-contract=off so
the compiler fuses nothing else. tests/optim/test_adamw8bit.py holds it to the reference bit for bit.

The library is built once per machine with the system C compiler (kernels/_cc.py) and loaded with ctypes; ctypes releases the GIL, so torch.get_num_threads() Python threads each
take a share of the blocks. Without a compiler, `load()` returns None and the caller uses the reference.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from ._cc import build_library

SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define BLOCK 256  /* values per quantization block */

/* One block of float32 values -> codes: the nearest code by bitsandbytes' 65,536-point grid (blockwise8.py).
   The grid index is computed in one vectorisable loop, the table lookup (a byte gather) in a second. */
static void quantize_block(const float *x, int len, float absmax, const uint8_t *lut, uint8_t *codes) {
    int32_t j[BLOCK];
    if (absmax == 0.0f) {  /* an all-zero block: code 0 everywhere */
        for (int i = 0; i < len; i++) codes[i] = 0;
        return;
    }
    float inv = 1.0f / absmax;
    for (int i = 0; i < len; i++) {
        float v = x[i] * inv;
        v = v > -1.0f ? v : -1.0f;  /* clamp to [-1, 1]; (a NaN lands on -1, never outside the table) */
        v = v < 1.0f ? v : 1.0f;
        j[i] = (int32_t)(((v + 1.0f) * 0.5f) * 65535.0f + 0.5f);  /* truncation, as the reference's cast */
    }
    for (int i = 0; i < len; i++) codes[i] = lut[j[i]];
}

/* |x| as the bits of a float: for finite x they order as |x| does, so a maximum can be taken on integers */
static inline uint32_t abs_bits(float x) {
    union { float f; uint32_t u; } b = {x};
    return b.u & 0x7fffffffu;
}

static inline float from_bits(uint32_t u) {
    union { uint32_t u; float f; } b = {u};
    return b.f;
}

/* torch's CPU sqrt where it calls MKL (vmsSqrt: within an ulp, not always correctly rounded); else NULL */
typedef void (*vector_sqrt)(int n, const float *in, float *out, int64_t mode);

/* AdamW on blocks [first, last) of n float32 values, states 8-bit (adamw8bit.py's docstring has the maths). */
void adamw8bit_blocks(float *p, const float *g, uint8_t *m_codes, float *m_absmax, uint8_t *v_codes,
                      float *v_absmax, const float *code1, const float *code2, const uint8_t *lut1,
                      const uint8_t *lut2, int64_t n, int64_t first, int64_t last, float beta1,
                      float one_minus_beta1, float beta2, float one_minus_beta2, float correction2, float eps,
                      int apply_decay, float decay, float step_size, vector_sqrt mkl_sqrt, int64_t mkl_mode) {
    float m[BLOCK], v[BLOCK], root[BLOCK];
    for (int64_t b = first; b < last; b++) {
        int64_t start = b * BLOCK;
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        float m_scale = m_absmax[b], v_scale = v_absmax[b];
        uint32_t m_max = 0, v_max = 0;  /* bits of the block maxima of |m| and |v| (integer max vectorises) */
        for (int i = 0; i < len; i++) {
            float grad = g[start + i];
            float mi = code1[m_codes[start + i]] * m_scale;         /* dequantize */
            float vi = code2[v_codes[start + i]] * v_scale;
            mi = fmaf(grad, one_minus_beta1, mi * beta1);           /* m.mul_(beta1).add_(g, alpha=1 - beta1) */
            vi = fmaf(one_minus_beta2 * grad, grad, vi * beta2);    /* v.mul_(beta2).addcmul_(g, g, 1 - beta2) */
            m[i] = mi;
            v[i] = vi;
            uint32_t am = abs_bits(mi), av = abs_bits(vi);
            m_max = am > m_max ? am : m_max;
            v_max = av > v_max ? av : v_max;
        }
        if (mkl_sqrt) {
            mkl_sqrt(len, v, root, mkl_mode);                       /* v.sqrt(), as torch computes it */
        } else {
            for (int i = 0; i < len; i++) root[i] = sqrtf(v[i]);
        }
        for (int i = 0; i < len; i++) {
            float denom = root[i] / correction2 + eps;
            float pk = p[start + i];
            if (apply_decay) pk = pk * decay;
            p[start + i] = pk + (step_size * m[i]) / denom;         /* p.addcdiv_(m, denom, value=step_size) */
        }
        m_absmax[b] = from_bits(m_max);
        v_absmax[b] = from_bits(v_max);
        quantize_block(m, len, m_absmax[b], lut1, m_codes + start);  /* requantize with the new absmax */
        quantize_block(v, len, v_absmax[b], lut2, v_codes + start);
    }
}
"""
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC"]

VML_MODE = 0x2 | 0x140000 | 0x100  # VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, as torch calls vmsSqrt
_LIB: list = []  # [(library, sqrt function, mode) or None], once loaded or found missing
_POOL: list = []  # [ThreadPoolExecutor]


def _torch_sqrt() -> tuple[int | None, int]:
    """(address of the MKL function torch's CPU sqrt calls, its mode), or (None, 0) where torch has no MKL.

    torch computes float32 sqrt on the CPU with MKL's vmsSqrt in its high-accuracy mode (ATen/cpu/vml.h), which
    is within an ulp but not always the correctly rounded sqrtf. The step divides by sqrt(v), so the parameter
    is bit-exact only with the same function: libtorch_cpu exports it, and the C loop calls it per block."""
    if not torch.backends.mkl.is_available():
        return None, 0
    try:
        fn = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).vmsSqrt
    except (OSError, AttributeError):
        return None, 0
    return ctypes.cast(fn, ctypes.c_void_p).value, VML_MODE


def _agrees_with_torch(sqrt_fn: int | None, mode: int) -> bool:
    """The sqrt the loop will use gives torch.sqrt's bits (probed on values of every magnitude the states take)."""
    probe = torch.logspace(-30, 2, 4099, dtype=torch.float32) * torch.linspace(1, 1.7, 4099)
    out = torch.empty_like(probe)
    if sqrt_fn is None:
        return True  # sqrtf is correctly rounded; so is torch's own vectorised sqrt without MKL
    ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(sqrt_fn)(
        probe.numel(), probe.data_ptr(), out.data_ptr(), mode)
    return torch.equal(out, probe.sqrt())


def load():
    """(compiled library, torch's sqrt function or None, its mode), or None (with one warning) where no C
    compiler works or where the sqrt cannot be matched."""
    if not _LIB:
        loaded = None
        try:
            lib = build_library("adamw8bit_cpu-", SOURCE, FLAGS, link=("-lm",))
            f, i64, ptr = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p
            lib.adamw8bit_blocks.argtypes = [ptr] * 10 + [i64] * 3 + [f] * 6 + [ctypes.c_int, f, f, ptr, i64]
            lib.adamw8bit_blocks.restype = None
            sqrt_fn, mode = _torch_sqrt()
            if not _agrees_with_torch(sqrt_fn, mode):
                raise OSError("torch's CPU sqrt could not be reproduced")
            loaded = (lib, sqrt_fn, mode)
        except (OSError, RuntimeError) as e:
            warnings.warn(f"AdamW8bit's CPU kernel could not be built ({e}); using the slower PyTorch reference")
        _LIB.append(loaded)
    return _LIB[0]


def _one_mkl_thread() -> None:
    """Each worker calls MKL's sqrt on its own blocks: MKL must not start a thread team of its own per worker
    (its OpenMP threads would spin against ours; measured 10x slower on 2 cores)."""
    if torch.backends.mkl.is_available():
        ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).MKL_Set_Num_Threads_Local(1)


def supports(p: Tensor, g: Tensor) -> bool:
    """Whether the C loop can take this update: float32 on the CPU, and a library to run it."""
    return p.device.type == "cpu" and p.dtype == torch.float32 and g.dtype == torch.float32 and load() is not None


def adamw8bit_update_cpu_(p: Tensor, g: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor,
                          v_absmax: Tensor, code1: Tensor, code2: Tensor, lut1: Tensor, lut2: Tensor, *,
                          beta1: float, beta2: float, correction2: float, eps: float, decay: float | None,
                          step_size: float) -> None:
    """The update in place on contiguous CPU tensors (checked by the caller); decay None: no weight decay."""
    n = p.numel()
    n_blocks = -(-n // 256)
    lib, sqrt_fn, mode = load()
    args = [t.data_ptr() for t in (p, g, m_codes, m_absmax, v_codes, v_absmax, code1, code2, lut1, lut2)]
    scalars = [beta1, 1.0 - beta1, beta2, 1.0 - beta2, correction2, eps, int(decay is not None),
               1.0 if decay is None else decay, step_size, sqrt_fn, mode]
    threads = max(1, min(torch.get_num_threads(), n_blocks // 64))  # small tensors: one thread
    if threads == 1:
        lib.adamw8bit_blocks(*args, n, 0, n_blocks, *scalars)
        return
    if not _POOL or _POOL[0]._max_workers < threads:
        _POOL[:] = [ThreadPoolExecutor(max_workers=threads, initializer=_one_mkl_thread)]
    bounds = [n_blocks * i // threads for i in range(threads + 1)]
    jobs = [_POOL[0].submit(lib.adamw8bit_blocks, *args, n, a, b, *scalars) for a, b in itertools.pairwise(bounds)]
    for job in jobs:
        job.result()
