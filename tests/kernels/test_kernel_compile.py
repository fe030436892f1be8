"""Every Triton kernel in kernels/ compiles for sm_80 (A100) and sm_90 (H100), exactly as the wrappers launch
it, with no register spills. No GPU needed: Triton's compiler and the ptxas in its wheel do the work.

    python tests/kernels/test_kernel_compile.py     # the table: kernel x variant x target -> registers, spills, and
                                            # the global loads/stores of the PTX (count x width per thread)

Why a subprocess: conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA, and then @triton.jit makes
interpreter objects that cannot be compiled; the script below runs with it unset, so it gets real JITFunctions.

Why the launches are intercepted rather than written down here: the script calls the public wrappers
(quantize_nf4, dequantize_nf4, quantize/dequantize_blockwise8, adamw8bit_update_) with backend="triton" on CPU
tensors, for every dtype, flag and blocksize a caller can pass (VARIANTS). Each kernel launch is caught before
it reaches a GPU and its arguments go through Triton's own binder, the code `kernel[grid](...)` runs: pointer
dtypes, 16-byte alignment and int divisibility, constexprs and options (num_warps, enable_fp_fusion). So a
changed launch in a wrapper is compiled here as launched, with nothing to keep in step by hand; only a new
public option needs a line in VARIANTS. The test also fails if a @triton.jit function in kernels/ is
neither launched by some variant nor called from a launched kernel (a kernel this test would miss).

Tied to Triton's internals (`create_function_from_signature`, `JITFunction._pack_args`, the ptxas log) as of
Triton 3.9: if those move, this test fails loudly rather than passing without compiling.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = (80, 90)  # compute capabilities: A100, H100
MAX_REGISTERS = 255  # ptxas's ceiling per thread; reaching it is where spilling starts


def variants():
    """(label, call) for every way the wrappers launch a kernel. n = 8192 elements: a multiple of 16 (as real
    weights are) and of every blocksize; "unaligned" calls use an odd n, which Triton specialises differently.
    Every dtype and flag at the blocksizes in use (64: NF4's default; 256: blockwise8's, the nested absmax's
    and the optimizer's) and at the legal extremes (32, 4096); the blocksizes between with one dtype, which
    keeps the test near 30 s of CPU instead of a minute."""
    import torch

    from nanoft.kernels import dequantize_blockwise8, dequantize_nf4, quantize_blockwise8, quantize_nf4
    from nanoft.kernels.adamw8bit import BLOCKSIZE as ADAM_BLOCKSIZE
    from nanoft.kernels.adamw8bit import adamw8bit_update_

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    per_blocksize = {32: list(dtypes), 64: list(dtypes), 128: ["bf16"], 256: list(dtypes), 512: ["fp32"],
                     1024: ["bf16"], 2048: ["fp16"], 4096: list(dtypes)}
    x = lambda n, dt: torch.randn(n).to(dtypes[dt])

    def adam(n, dt):
        p, g = x(n, dt), x(n, dt)
        blocks = -(-n // ADAM_BLOCKSIZE)
        states = (torch.zeros(n, dtype=torch.uint8), torch.ones(blocks), torch.zeros(n, dtype=torch.uint8),
                  torch.ones(blocks))
        return lambda: adamw8bit_update_(p, g, *states, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                         weight_decay=0.1, backend="triton")

    out = []
    for n, tag in ((8192, ""), (4097, " unaligned")):
        for bs, names in (per_blocksize.items() if not tag else [(64, list(dtypes))]):
            for dt in names:  # blockwise8 first: its launches get its own labels, not quantize_nf4's
                out.append((f"quantize_blockwise8(x={dt}, blocksize={bs}){tag}",
                            lambda n=n, dt=dt, bs=bs: quantize_blockwise8(x(n, dt), blocksize=bs, backend="triton")))
                out.append((f"dequantize_blockwise8(out={dt}, blocksize={bs}){tag}",
                            lambda n=n, dt=dt, bs=bs: dequantize_blockwise8(
                                torch.zeros(n, dtype=torch.uint8), torch.ones(-(-n // bs)), blocksize=bs,
                                dtype=dtypes[dt], backend="triton")))
        for bs, names in (per_blocksize.items() if not tag else [(64, list(dtypes))]):
            for dt in names:
                for dq in (False, True):  # double_quant adds a blockwise8 launch on the absmax
                    out.append((f"quantize_nf4(x={dt}, blocksize={bs}, double_quant={dq}){tag}",
                                lambda n=n, dt=dt, bs=bs, dq=dq: quantize_nf4(x(n, dt), bs, dq, backend="triton")))
                    q = quantize_nf4(x(n, "fp32"), bs, dq, backend="torch")
                    out.append((f"dequantize_nf4(out={dt}, double_quant={dq}, blocksize={bs}){tag}",
                                lambda q=q, dt=dt: dequantize_nf4(q, dtypes[dt], backend="triton")))
        for dt in dtypes:
            out.append((f"adamw8bit_update_(p={dt}){tag}", adam(n, dt)))
    return out


def collect_launches():
    """Run every variant with each kernel's launch intercepted; return (kernels, launches) where launches are
    (kernel, variant label, args, kwargs), deduplicated by what Triton would specialise on (sm_90 binder)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import nanoft.kernels.adamw8bit
    import nanoft.kernels.blockwise8
    import nanoft.kernels.nf4

    modules = (nanoft.kernels.nf4, nanoft.kernels.blockwise8, nanoft.kernels.adamw8bit)
    jitted = {f"{m.__name__}.{k}": v for m in modules for k, v in vars(m).items()
              if isinstance(v, JITFunction) and v.__module__ == m.__name__}
    assert jitted, "no JITFunctions found: is TRITON_INTERPRET set?"
    launches, seen = [], set()
    current = [None]
    backend = make_backend(GPUTarget("cuda", 90, 32))

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            _, specialization, options = binder(*args, **kwargs)
            key = (kernel.__name__, repr(specialization), repr(sorted(options.items())))
            if key not in seen:
                seen.add(key)
                launches.append((kernel, current[0], args, kwargs))
        return run

    for kernel in jitted.values():
        kernel.run = recorder(kernel)  # shadows JITFunction.run, which `kernel[grid](...)` calls
    for label, call in variants():
        current[0] = label
        call()
    launched = {k.__name__ for k, *_ in launches}
    sources = "\n".join(k.src for k, *_ in launches)
    missed = [name for name, f in jitted.items()
              if f.__name__ not in launched and f"{f.__name__}(" not in sources]
    assert not missed, f"@triton.jit functions no variant launches or calls: {missed}"
    return launches


def compile_one(job):
    """Compile one launch for one target as JITFunction.run would; registers and spills from the ptxas log."""
    import contextlib
    import io
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, label, args, kwargs, capability = job
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    row = dict(kernel=kernel.__name__, variant=label, target=f"sm_{capability}", error=None)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # ptxas's -v report is printed when dump_ptxas_log is set
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # noqa: BLE001  (a compile error is the finding; report it, keep going)
        row["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        return row
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not spills:
        row["error"] = f"no ptxas report found in: {text[-500:]!r}"
        return row
    ptx = compiled.asm["ptx"]
    ops = {}
    for op, suffix in re.findall(r"\b(ld|st)\.global((?:\.[\w:]+)*)", ptx):
        width = ".".join(p for p in suffix.split(".") if p and "::" not in p)  # drop cache hints
        ops[f"{op} {width}"] = ops.get(f"{op} {width}", 0) + 1
    row.update(regs=int(regs[-1]), spill_bytes=sum(map(int, spills[-1])), num_warps=compiled.metadata.num_warps,
               fp_fusion=options.enable_fp_fusion, global_mem=ops)
    return row


def compile_all(workers: int) -> list[dict]:
    import multiprocessing

    import triton

    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    global JOBS
    JOBS = [(*launch, cap) for launch in collect_launches() for cap in TARGETS]
    if workers <= 1:
        return [compile_one(j) for j in JOBS]
    # fork: the children inherit the recorded launches (tensors, JITFunctions) instead of pickling them
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_compile_index, range(len(JOBS)), chunksize=1)


def _compile_index(i: int) -> dict:
    return compile_one(JOBS[i])


def fmt_mem(ops: dict) -> str:
    return "  ".join(f"{n}x {k}" for k, n in sorted(ops.items()))


def print_table(rows: list[dict]) -> None:
    """One line per kernel and variant: registers / spilled bytes per target, then sm_90's global accesses."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["kernel"], r["variant"]), {})[r["target"]] = r
    w = max(len(v) for _, v in by_key)
    targets = [f"sm_{c}" for c in TARGETS]
    print(f"{'kernel':<30} {'variant':<{w}} " + " ".join(f"{t + ' regs/spill':>16}" for t in targets)
          + f"  warps  {targets[-1]} global ld/st per thread (PTX: count x width)")
    for (kernel, variant), per in sorted(by_key.items()):
        cells = [("ERROR" if per[t]["error"] else f"{per[t]['regs']}/{per[t]['spill_bytes']}") for t in targets]
        last = per[targets[-1]]
        tail = last["error"][:300] if last["error"] else f"{last['num_warps']:>5}  {fmt_mem(last['global_mem'])}"
        print(f"{kernel:<30} {variant:<{w}} " + " ".join(f"{c:>16}" for c in cells) + f"  {tail}")


def run_script(*flags: str) -> subprocess.CompletedProcess:
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # a fresh cache: every kernel really goes through ptxas
        return subprocess.run([sys.executable, __file__, *flags], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)


def test_every_kernel_compiles_without_spills():
    r = run_script("--json")
    assert r.returncode == 0, r.stderr[-5000:]
    rows = json.loads(r.stdout.splitlines()[-1])
    errors = [f"{x['kernel']} {x['variant']} {x['target']}: {x['error']}" for x in rows if x["error"]]
    assert not errors, "\n".join(errors)
    spilled = [f"{x['kernel']} {x['variant']} {x['target']}: {x['spill_bytes']} bytes" for x in rows
               if x["spill_bytes"] or x["regs"] >= MAX_REGISTERS]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    assert {x["target"] for x in rows} == {f"sm_{c}" for c in TARGETS}
    assert {x["kernel"] for x in rows} >= {"_quantize_nf4_kernel", "_dequantize_nf4_kernel", "_adamw8bit_kernel",
                                           "_quantize_blockwise8_kernel", "_dequantize_blockwise8_kernel"}
    # every launch asks for the same floating-point contraction: off (the kernels match torch's roundings)
    assert {x["fp_fusion"] for x in rows} == {False}, "a wrapper launches without enable_fp_fusion=False"


def test_auto_backend_needs_triton(monkeypatch):
    """backend="auto" takes the kernel only on CUDA *and* with Triton installed; else the reference."""
    import torch

    from nanoft.kernels import _triton

    cuda = torch.device("cuda")
    assert _triton.use_triton("auto", cuda) == _triton.AVAILABLE
    monkeypatch.setattr(_triton, "AVAILABLE", False)
    assert not _triton.use_triton("auto", cuda) and not _triton.use_triton("auto", torch.device("cpu"))
    assert _triton.use_triton("triton", torch.device("cpu")) and not _triton.use_triton("torch", cuda)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, don't interpret
    sys.path.insert(0, str(ROOT))
    results = compile_all(workers=min(2, os.cpu_count() or 1))
    if "--json" in sys.argv:
        print(json.dumps(results))
    else:
        print_table(results)
