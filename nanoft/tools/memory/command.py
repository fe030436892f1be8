"""Will a run fit? Estimate its memory before starting, and measure it to check the estimate.

    python -m nanoft memory configs/100m.py                          # estimate: table + optimizer x mode comparison
    python -m nanoft memory configs/100m.py --finetune=qlora --gradient_checkpointing=True
    python -m nanoft memory configs/100m.py --measure --batch_size=2   # build it, run steps, measure beside the estimate
    python -m nanoft memory --shape=llama-70b --block_size=4096 --batch_size=1 --device=cuda
    python -m nanoft memory --shape=7b                              # the 16 bytes/parameter rule: 112 GB
    python -m nanoft memory --shape=llama-7b --finetune=qlora --fsdp=True --nproc=8 --device=cuda   # one of 8 ranks
    python -m nanoft memory --arch=llama --n_layer=32 --n_embd=4096 --n_head=32 --intermediate=11008 --vocab_size=32000

The estimate (nanoft.tools.memory.estimate) needs only shapes, so a 70B model is estimated without allocating it.
--measure builds the real model and optimizer and runs a few training steps exactly as train.py does, then
reports what was really there:

    parameters, gradients, optimizer states   exact: the bytes of the distinct tensor storages found on the
                                              model and in optimizer.state (host and device separately)
    activations   the bytes of the distinct tensors autograd saved for backward, summed by a
                  torch.autograd.graph.saved_tensors_hooks pack hook (exact on any device)
    total (peak)  CUDA: torch.cuda.max_memory_allocated over the measured steps.
                  CPU: there is no max_memory_allocated, so the steps run under torch.profiler with
                  profile_memory=True, which receives every allocation and free of torch's CPU allocator; their
                  running sum, on top of the bytes alive when profiling starts (parameters and states, counted
                  exactly), is the same quantity. It sees tensors only: not Python objects or the libraries'
                  own memory. The process's RSS (ru_maxrss) would include those, and never comes down, so it
                  is shown only as an aside. tracemalloc does not see torch's allocations at all.

Parameters, gradients and states are counted by nanoft.run.memory_measure, which train.py prints after its first step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import sys

import torch
from torch import nn

from nanoft.config import Config, ConfigError, describe, load_config, parse_overrides
from nanoft.interop.gguf import GPT2_VOCAB
from nanoft.interop.gguf import TYPES as GGUF_TYPES
from nanoft.interop.gguf import weight_bytes as gguf_weight_bytes
from nanoft.model.gpt import GPT
from nanoft.objectives import method_of
from nanoft.optim import OPTIMIZERS, make_optimizer
from nanoft.run.memory_measure import exact_bytes, fmt, nf4_tensors
from nanoft.tools.memory.estimate import Run, inference_bytes
from nanoft.tools.memory.peak import peak_bytes
from nanoft.tools.memory.shape import GB, PRESETS, ModelShape
from nanoft.tools.memory.sharded import per_rank

MODES = ("full", "lora", "qlora", "prefix", "adapter")
# flags of this command that are not Config keys; every other --key=value must be a Config key
SHAPE_FLAGS = {"shape": str, "params": float, "arch": str, "intermediate": int, "n_kv_head": int}
OWN_FLAGS = {"measure": bool, "steps": int, "nproc": int, **SHAPE_FLAGS}


# --- measuring a real run ------------------------------------------------------------------------------

class MeasureError(RuntimeError):
    """--measure cannot run (a piece it needs is missing, or the model is too big for this machine)."""


def build(cfg: Config, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer exactly as train.py builds them (random weights: memory does not care)."""
    torch.manual_seed(cfg.seed)
    peft = method_of(cfg).peft(cfg)  # LoRA, QLoRA, prefix or adapters; None when every weight trains
    model = (peft.apply(GPT(cfg), cfg, device) if peft else GPT(cfg)).to(device)
    return model, make_optimizer(cfg, model)


def _autocast(run: Run):
    dtype = {4: torch.float32, 2: torch.bfloat16}[run.act_bytes]
    if run.cfg.dtype == "float16":
        dtype = torch.float16
    return torch.autocast(run.device, dtype) if dtype != torch.float32 else contextlib.nullcontext()


def _batch(cfg: Config, device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.randint(0, cfg.vocab_size, (2, cfg.batch_size, cfg.block_size), generator=gen).to(device)
    return x, y


def train_step(model: nn.Module, optimizer, run: Run, gen: torch.Generator, held: dict) -> int:
    """One optimizer step as train.py takes it; returns the gradient bytes after the last backward. `held` keeps
    what a step leaves alive until the next one, as train.py's loop does."""
    cfg = run.cfg
    grads = 0
    for _micro in range(cfg.grad_accum):
        x, y = _batch(cfg, run.device, gen)
        with _autocast(run):
            loss = model(x, y)
            loss = loss / cfg.grad_accum
        loss.backward()
        del x, y, loss
    grads = exact_bytes(model, None)["grads"]
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grads


def saved_activation_bytes(model: nn.Module, run: Run, gen: torch.Generator) -> dict[str, int]:
    """Bytes of the distinct tensors autograd saves in one forward (parameters excluded: they are counted as
    parameters), summed by a saved_tensors_hooks pack hook. With gradient checkpointing the forward saves only
    block inputs; what one block's recompute saves is then measured by running the forward once more without
    checkpointing and taking the largest block (its input excluded: checkpointing already keeps it)."""
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers()) + nf4_tensors(model)}

    def forward_saved() -> tuple[int, list[int]]:
        seen: dict[int, int] = {}
        per_block: list[int] = []
        inside = {"block": False, "input": None}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in params and st.data_ptr() not in seen:
                seen[st.data_ptr()] = st.nbytes()
                if inside["block"] and st.data_ptr() != inside["input"]:
                    per_block[-1] += st.nbytes()
            return t

        def block_start(_module, args):
            inside.update(block=True, input=args[0].untyped_storage().data_ptr())
            per_block.append(0)

        def block_end(_module, _args, _out):
            inside["block"] = False

        hooks = [b.register_forward_pre_hook(block_start) for b in model.blocks]
        hooks += [b.register_forward_hook(block_end) for b in model.blocks]
        try:
            x, y = _batch(run.cfg, run.device, gen)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(run):
                loss = model(x, y)
            del loss  # the graph goes, and the saved tensors with it: no backward needed
        finally:
            for h in hooks:
                h.remove()
        return sum(seen.values()), per_block

    forward, _ = forward_saved()
    recompute = 0
    if getattr(model, "gradient_checkpointing", False):
        model.gradient_checkpointing = False
        try:
            recompute = max(forward_saved()[1])
        finally:
            model.gradient_checkpointing = True
    return {"forward": forward, "recompute": recompute, "peak": forward + recompute}


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines to fd 2; keep them out of the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_bytes(fn, alive_at_start: int) -> int:
    """Peak bytes held by torch's CPU allocator while fn() runs: alive_at_start plus the largest running sum of
    the allocations (+) and frees (-) that torch.profiler(profile_memory=True) records in time order. Frees of
    tensors allocated before the start are not reported, so only tensors that outlive fn() (parameters,
    optimizer states) should be alive then: the caller counts those exactly."""
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return alive_at_start + peak


def measure(cfg: Config, steps: int = 1) -> dict:
    """Build the run, take one warm-up step (so the optimizer states exist), then measure: exact bytes of
    parameters, gradients and states, the saved activations, and the peak over `steps` more steps."""
    run = Run.from_config(cfg, torch.cuda.is_available())
    if run.device == "cuda" and not torch.cuda.is_available():
        raise MeasureError("--measure with device=cuda needs a GPU; this machine has none (use --device=cpu)")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model, optimizer = build(cfg, run.device)
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    held: dict = {}
    grads = train_step(model, optimizer, run, gen, held)
    got = exact_bytes(model, optimizer)
    got["grads"] = grads
    held.clear()
    act = saved_activation_bytes(model, run, gen)

    def steps_fn():
        for _ in range(steps):
            train_step(model, optimizer, run, gen, held)
        held.clear()

    if run.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        steps_fn()
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        alive = exact_bytes(model, optimizer)  # grads are None: zero_grad freed them
        peak = cpu_peak_bytes(steps_fn, alive["params"] + alive["states"] + alive["states_host"])
        how = "torch.profiler CPU allocator events"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return {**got, "activations": act["peak"], "act_forward": act["forward"], "act_recompute": act["recompute"],
            "total": peak, "how": how, "rss_growth": rss,
            "transient": peak - got["params"] - got["grads"] - got["states"] - act["peak"] -
            (got["states_host"] if run.device == "cpu" else 0)}


# --- the command ---------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> tuple[Config, str, dict]:
    """CONFIG [--key=value ...] -> (Config, a label, this command's own flags). The config file is optional
    (defaults are used) so that `--shape=llama-70b` alone works; unknown keys are errors with suggestions."""
    path = None
    if argv and not argv[0].startswith("--"):
        path, argv = argv[0], argv[1:]
    own, rest = {}, []
    for arg in argv:
        key, _, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in OWN_FLAGS:
            kind = OWN_FLAGS[key]
            if kind is bool:
                own[key] = text in ("", "True", "true", "1")
            else:
                try:
                    own[key] = kind(float(text)) if kind is int else kind(text)
                except (ValueError, OverflowError):
                    raise ConfigError(f"--{key} expects {kind.__name__}, got {text!r}") from None
                if kind in (int, float) and not 1 <= own[key] < float("inf"):  # sizes and counts; NaN fails too
                    raise ConfigError(f"--{key} must be at least 1, got {text!r}")
        else:
            rest.append(arg)
    cfg = load_config(path, rest) if path else Config(**parse_overrides(rest))
    return cfg, path or "defaults", own


def shape_from_args(cfg: Config, own: dict, argv: list[str]) -> ModelShape:
    """The config's GPT shape, or a preset / nominal count / explicit LLaMA dimensions from the command line."""
    if "params" in own:
        return ModelShape("nominal", nominal_params=int(own["params"]))
    if "shape" in own:
        if own["shape"] not in PRESETS:
            raise ConfigError(f"unknown --shape {own['shape']!r}; presets: {', '.join(PRESETS)}")
        shape = PRESETS[own["shape"]]
    else:
        shape = ModelShape.from_config(cfg)
        if own.get("arch", "gpt") == "llama":
            shape = dataclasses.replace(shape, arch="llama", bias=False, tied=False, block_size=0)
        elif own.get("arch", "gpt") != "gpt":
            raise ConfigError(f"--arch must be gpt or llama, got {own['arch']!r}")
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    dims = {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "bias") if k in given}
    if shape.arch == "gpt" and "block_size" in given:
        dims["block_size"] = cfg.block_size
    dims.update({k: own[k] for k in ("intermediate", "n_kv_head") if k in own})
    if shape.arch == "gpt" and "n_embd" in dims and "intermediate" not in own:
        dims["intermediate"] = 4 * dims["n_embd"]
    if shape.arch != "nominal" and (dims.get("n_embd", shape.n_embd) % dims.get("n_head", shape.n_head)):
        raise ConfigError("n_embd must be divisible by n_head")
    return dataclasses.replace(shape, **dims) if shape.arch != "nominal" else shape


def _describe(shape: ModelShape, run: Run, label: str, est: dict) -> str:
    cfg = run.cfg
    if shape.arch == "nominal":
        what = f"a nominal {shape.nominal_params / 1e9:g}B-parameter model (no dimensions: activations not estimated)"
    else:
        what = (f"{shape.arch} {shape.n_layer} layers x {shape.n_embd} wide, {est['n_params'] / 1e6:,.2f}M parameters"
                f" ({est['n_trainable'] / 1e6:,.2f}M trainable)")
    dtype = {4: "float32", 2: cfg.dtype if cfg.dtype != "auto" else "bfloat16"}[run.act_bytes]
    frozen = {4: "float32", 2: dtype}[run.frozen_bytes]
    return (f"memory of {label}: {what}\n"
            f"  {run.mode} ({cfg.finetune}), {cfg.optimizer}, {run.device}, activations in {dtype} "
            f"({'parameters float32' if run.mode == 'full' else f'frozen base {frozen}, trained float32'}), batch {cfg.batch_size} x {cfg.block_size} tokens, grad_accum {cfg.grad_accum}, "
            f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")


def table(est: dict, got: dict | None) -> str:
    rows = [("parameters", "params"), ("gradients", "grads"), ("optimizer states", "states"),
            ("  states in host memory", "states_host"), ("frozen reference/teacher/RM", "frozen_model"),
            ("whole groups (FSDP gathers)", "gathered"), ("activations (saved)", "activations"),
            ("logits, loss grads, scratch", "transient"), ("total (peak)", "total")]
    head = f"{'':<30}{'estimate':>12}" + (f"{'measured':>12}{'diff':>9}" if got else "")
    lines = [head]
    for label, key in rows:
        if key in ("states_host", "frozen_model", "gathered") and not est.get(key) and not (got and got.get(key)):
            continue  # (--measure builds only the model that trains: no reference or teacher)
        line = f"{label:<30}{fmt(est[key]):>12}"
        if got:
            diff = f"{100 * (est[key] - got[key]) / got[key]:+.1f}%" if got.get(key) else ""
            line += f"{fmt(got.get(key, 0)):>12}{diff:>9}"
        lines.append(line)
    if got:
        lines.append(f"  measured: exact storages; activations by saved_tensors_hooks "
                     f"({fmt(got['act_forward'])} forward + {fmt(got['act_recompute'])} recompute); peak by {got['how']}")
        if got["rss_growth"] > 0:
            lines.append(f"  aside: the process's peak RSS grew {fmt(got['rss_growth'])} (includes the warm-up and"
                         " allocator caching; not tensors alone)")
    else:
        lines.append(f"  estimate only; peak moment: {est['peak_moment']}. Add --measure to build it and compare.")
    return "\n".join(lines)


def comparison(shape: ModelShape, run: Run) -> str:
    """Total peak, and parameters + gradients + states, for every optimizer x fine-tuning mode."""
    lines = [f"{'optimizer':<18}" + "".join(f"{m + ' peak':>13}{m + ' p+g+s':>13}" for m in MODES)]
    for opt in OPTIMIZERS:
        cells = []
        for mode in MODES:
            r = Run(dataclasses.replace(run.cfg, optimizer=opt, finetune=mode, finetune_weights="full", teacher_from="",
                                        reward_from=""),
                    run.device, run.act_bytes)
            try:
                e = peak_bytes(shape, r)
                static = e["params"] + e["grads"] + e["states"] + e["states_host"]
                cells.append(f"{fmt(e['total']) if shape.arch != 'nominal' else '-':>13}{fmt(static):>13}")
            except ValueError:
                cells.append(f"{'n/a':>13}{'n/a':>13}")
        lines.append(f"{opt:<18}" + "".join(cells))
    return "\n".join(lines)


def rule_16_lines(shape: ModelShape, est: dict) -> str:
    n = est["n_params"]
    fp32_adamw = peak_bytes(shape, Run(dataclasses.replace(Config(), optimizer="adamw", finetune="full",
                                                           batch_size=1, block_size=1), "cpu", 4))
    static = fp32_adamw["params"] + fp32_adamw["grads"] + fp32_adamw["states"]
    return (f"the 16 bytes/parameter rule (4 weights + 4 gradients + 8 Adam states), fp32 AdamW full fine-tune, parameters + gradients + Adam states (activations "
            f"excluded): 16 B x {n:,} = {16 * n / GB:,.2f} GB (decimal); tensor by tensor: {static / GB:,.2f} GB")


def inference_lines(shape: ModelShape, cfg: Config | None = None) -> str:
    """The weights for inference with the block linears quantized (python -m nanoft quantize), per format; with the
    run's cfg (a GPT shape) also the GGUF files llama.cpp reads (python -m nanoft export --to m.gguf)."""
    rows = [("float32", "float32", {}), ("bfloat16 blocks", "bfloat16", {}), ("int8 (rtn8, gptq8)", "int8", {}),
            ("int4 g128 (rtn4, gptq4, awq4)", "int4", {"group_size": 128}), ("int4 g32", "int4", {"group_size": 32}),
            ("nf4 (blocks of 64, dq)", "nf4", {})]
    base = inference_bytes(shape, "float32")
    lines = ["weights for inference, block linears quantized (embeddings, norms, biases float32; python -m nanoft quantize):"]
    for label, layer_format, params in rows:
        got = inference_bytes(shape, layer_format, **params)
        lines.append(f"  {label:<32}{fmt(got):>12}  {got / base:6.1%} of float32")
    if cfg is not None and shape.arch == "gpt" and cfg.vocab_size >= GPT2_VOCAB:  # GGUF carries GPT-2's tokenizer
        # every tensor: q4_0 keeps the head in q8_0, norms and biases f32
        lines.append("GGUF files for llama.cpp, tensors only (+ ~1.8 MB of tokenizer; python -m nanoft export --to m.gguf):")
        for gguf_type in GGUF_TYPES:
            got = gguf_weight_bytes(cfg, gguf_type)
            lines.append(f"  {'gguf ' + gguf_type:<32}{fmt(got):>12}  {got / base:6.1%} of float32")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if not argv or "--help" in argv or "-h" in argv:
        print(__doc__ + "\nflags: --measure --steps=N --shape=" + "|".join(PRESETS) +
              " --params=N --arch=gpt|llama --intermediate=N --n_kv_head=N --nproc=N (per rank; with --fsdp=True sharded)\n" + describe())
        return
    cfg, label, own = parse_args(argv)
    shape = shape_from_args(cfg, own, argv)
    if shape.arch == "gpt":
        cfg = dataclasses.replace(cfg, n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head,
                                  vocab_size=shape.vocab_size, bias=shape.bias)
    label = own.get("shape", label) if "params" not in own else f"{own['params']:g} parameters"
    run = Run.from_config(cfg, torch.cuda.is_available())
    est = peak_bytes(shape, run)
    nproc = own.get("nproc", 1)
    if nproc > 1 and cfg.fsdp:  # one rank's share (nanoft.tools.memory.sharded)
        est = per_rank(est, shape, run, nproc)
    got = None
    if own.get("measure") and nproc > 1:
        raise MeasureError("--measure runs one process; under torchrun, train.py prints each rank's measured bytes")
    if own.get("measure"):
        if shape.arch != "gpt" or shape != ModelShape.from_config(cfg):
            raise MeasureError("--measure builds nanoft's GPT: it measures config shapes, not presets or LLaMA shapes")
        got = measure(cfg, own.get("steps", 1))
    print(_describe(shape, run, label, est))
    if nproc > 1:
        print(f"  per rank of {nproc}: " + ("FSDP2 shards (nanoft.tools.memory.sharded); batch_size is per rank" if cfg.fsdp else
              "DDP: every rank holds all of this (add --fsdp=True to shard); batch_size is per rank"))
    print(table(est, got))
    print(rule_16_lines(shape, est))
    print(f"\nestimates for every optimizer and mode (same shape, batch and precision; {run.device}"
          f"{'; one process' if nproc > 1 else ''}):")
    print(comparison(shape, run))
    if shape.arch != "nominal":
        print("\n" + inference_lines(shape, cfg))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, MeasureError, ValueError) as e:
        sys.exit(f"error: {e}")
