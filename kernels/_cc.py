"""Building the CPU kernels' C sources (adamw8bit_cpu.py, nf4_cpu.py) into shared libraries, once per machine.

As torch.compile does for its CPU kernels: the system C compiler ($CC, else cc, gcc or clang) compiles the source
into ~/.cache/nanoft ($NANOFT_CACHE overrides), under a name keyed by everything the binary depends on (the
source, the flags, the compiler and its version, and the CPU's feature flags, since -march=native builds for this
CPU only). The build happens in a temporary folder beside the cache and lands with one atomic rename, so
concurrent builds (several ranks, several tests) are safe. The caller loads the result with ctypes.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile


def build_library(prefix: str, source: str, flags: list[str], link: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The library compiled from `source` with `flags` (and `link`, after the source), loaded; built only when
    its cache file is missing. RuntimeError when there is no compiler or it fails (its first error line);
    OSError when the compiler cannot be run. A compiler without OpenMP (Apple's clang) builds it without
    -fopenmp: its `#pragma omp` lines are then ignored and it runs on one thread."""
    try:
        return _build(prefix, source, flags, link)
    except RuntimeError:
        if "-fopenmp" not in flags:
            raise
        return _build(prefix, source, [f for f in flags if f != "-fopenmp"], link)


def _build(prefix: str, source: str, flags: list[str], link: tuple[str, ...]) -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang; or $CC) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source, compiler, version, *flags, *link, _cpu_signature()]).encode())
    cache = os.environ.get("NANOFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanoft")
    path = os.path.join(cache, f"{prefix}{key.hexdigest()[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, built = os.path.join(tmp, "kernel.c"), os.path.join(tmp, "kernel.so")
            with open(src, "w") as f:
                f.write(source)
            run = subprocess.run([compiler, *flags, src, "-o", built, *link], capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {(run.stderr.strip().splitlines() or ['?'])[0]}")
            os.replace(built, path)
    return ctypes.CDLL(path)


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU must not load on another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.machine() + platform.processor()
