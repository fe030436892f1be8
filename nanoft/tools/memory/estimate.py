"""How much memory a training run needs, worked out from shapes alone: nothing is allocated.

The 16 bytes/parameter rule for a full fine-tune in fp32 with AdamW:

    memory = parameters (4 B/param) + gradients (4 B/param) + Adam states (8 B/param) + activations
           = 16 B/param + activations           7e9 params -> 112 GB,  70e9 params -> 1,120 GB (decimal GB)

This module extends each term to every mode nanoft trains in, tensor by tensor, so that the estimate of the
first three rows is *exact* (equal to the bytes a measurement finds) and the activations are derived from
what autograd actually saves in nanoft's forward pass:

    parameters   every parameter tensor at its dtype; QLoRA's frozen block linears as NF4 (codes, absmax ...)
    gradients    one per *trainable* parameter, at the parameter's dtype (frozen ones get none)
    states       per optimizer: AdamW 2 fp32 moments, 8-bit AdamW 1+1 bytes plus a block scale per 256,
                 Adafactor row + column statistics for a matrix; paged optimizers keep them in host memory
    activations  the tensors autograd saves for backward (see `activation_bytes`)
    transients   the logits that train.py holds, the loss's gradient, optimizer scratch (see `peak_bytes`)

`ModelShape` describes a model without building it: from a nanoft Config (GPT-2 shaped), from a preset
(`llama-7b`, `llama-70b`, `gpt2-xl` ...), or from a bare parameter count (`params=7e9`, the rule's own
figures: there are no dimensions then, so only the per-parameter rows are estimated).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from nanoft.config import Config
from nanoft.objectives import method_of
from nanoft.optim import optimizer_class
from nanoft.quant import FORMATS
from nanoft.run.precision import frozen_dtype, pick_dtype
from nanoft.tools.memory.shape import DTYPE_BYTES, ModelShape, ParamSpec, frozen_model_shapes, param_specs


def rows_per_forward(cfg: Config) -> int:
    """Rows a training forward holds: a batch of B preference pairs is 2B rows (chosen, rejected); PPO and GRPO
    train on a micro-batch of their rollout, B prompts x rl_samples / (rl_minibatches x grad_accum), rounded up
    (the rollout's own sampling runs under no_grad and keeps no activations)."""
    method = method_of(cfg)
    if method.data != "preferences":
        return cfg.batch_size
    if method.objective.frozen_models == ("reference", "reward"):  # PPO, GRPO
        return -(-cfg.batch_size * cfg.rl_samples // (cfg.rl_minibatches * cfg.grad_accum))
    return 2 * cfg.batch_size


# --- the three exact rows: parameters, gradients, optimizer states --------------------------------------

@dataclass(frozen=True)
class Run:
    """What besides the shape decides memory: the Config's keys, with device and dtype resolved."""
    cfg: Config
    device: str  # "cpu" | "cuda" | "mps"
    act_bytes: int  # bytes per element of autocast activations: 4 (fp32) or 2 (bf16/fp16)
    act_dtype: str = ""  # their dtype's name ("bfloat16"...); "" reads act_bytes as float32 or bfloat16

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.act_dtype) if self.act_dtype else {4: torch.float32, 2: torch.bfloat16}[self.act_bytes]

    @staticmethod
    def from_config(cfg: Config, cuda_available: bool = False) -> Run:
        device = cfg.device if cfg.device != "auto" else ("cuda" if cuda_available else "cpu")
        dtype = cfg.dtype
        if dtype == "auto":  # train.py's own rule (nanoft.run.precision); a GPU that is not here is taken to have bf16
            gpu_elsewhere = device == "cuda" and not torch.cuda.is_available()
            dtype = "bfloat16" if gpu_elsewhere else str(pick_dtype("auto", device, cfg.n_embd)).removeprefix("torch.")
        rows = rows_per_forward(cfg)
        return Run(replace(cfg, batch_size=rows) if rows != cfg.batch_size else cfg, device, DTYPE_BYTES[dtype], dtype)

    @property
    def mode(self) -> str:  # which weights train: "full", "lora", "qlora", "prefix" or "adapter" (the method table)
        return method_of(self.cfg).trains(self.cfg)

    @property
    def norms_trainable(self) -> bool:  # full fine-tuning and adapters train them; LoRA/QLoRA with lora_train_norms
        return self.mode in ("full", "adapter") or (self.mode in ("lora", "qlora") and self.cfg.lora_train_norms)

    @property
    def adapter_bytes(self) -> int:  # LoRA/QLoRA adapters: float32 master weights (nanoft.peft.lora's docstring)
        return 4

    @property
    def frozen_bytes(self) -> int:  # the frozen base: in the compute dtype (bf16 on CUDA), as peft does; on a
        # CPU nanoft.run.precision.frozen_dtype's rule (float32 under "auto")
        if self.device != "cpu":
            return self.act_bytes
        return DTYPE_BYTES[str(frozen_dtype(self.cfg.dtype, self.device)).removeprefix("torch.")]


def nf4_bytes(numel: int, blocksize: int, double_quant: bool, on_cpu: bool = True) -> int:
    """Bytes of one NF4 weight as nanoft.quant.nf4.NF4Tensor stores it: two 4-bit codes per byte and one absmax per
    block, fp32; or, double-quantized, one byte per block plus an fp32 scale per 256 blocks and an fp32 offset.
    (The 16-entry NF4 table and the 256-entry nested map are shared by all layers, not stored per weight.)"""
    blocks = math.ceil(numel / blocksize)
    codes = math.ceil(numel / 2)
    if not double_quant:
        return codes + 4 * blocks
    nested = math.ceil(blocks / 256)
    # quantized by the CPU reference, the 8-bit absmax is a view of a buffer padded to whole nested blocks of 256;
    # on a GPU apply_lora quantizes on the device, with the Triton kernel, which writes only the blocks
    absmax = 256 * nested if on_cpu else blocks
    return codes + absmax + 4 * nested + 4


def trainable_and_frozen(shape: ModelShape, run: Run) -> tuple[list[tuple[ParamSpec, int]], int]:
    """([(trainable tensor, bytes per element)], bytes of everything frozen) for the run's mode."""
    specs = param_specs(shape)
    cfg = run.cfg
    if run.mode == "full":
        return [(p, 4) for p in specs + method_specs(shape, run)], 0
    if shape.arch == "nominal":
        raise ValueError(f"{run.mode} needs the layer shapes: give --shape or dimensions, not only --params")
    trainable, frozen = [], 0
    for p in specs:
        if run.norms_trainable and p.norm:
            trainable.append((p, 4))
            continue
        if run.mode == "qlora" and p.target and len(p.shape) == 2:  # every block linear becomes NF4
            frozen += nf4_bytes(p.numel, cfg.nf4_blocksize, cfg.double_quant, run.device == "cpu")
        else:
            frozen += run.frozen_bytes * p.numel
        if run.mode in ("lora", "qlora") and p.target in cfg.lora_targets and len(p.shape) == 2:
            out_f, in_f = p.shape
            trainable += [(ParamSpec(p.name.replace(".weight", ".lora_A"), (cfg.lora_r, in_f)), run.adapter_bytes),
                          (ParamSpec(p.name.replace(".weight", ".lora_B"), (out_f, cfg.lora_r)), run.adapter_bytes)]
    return trainable + [(p, run.adapter_bytes) for p in method_specs(shape, run)], frozen


def method_specs(shape: ModelShape, run: Run) -> list[ParamSpec]:
    """What prefix tuning trains (nanoft.peft.prefix.PrefixEncoder: the embedding and the MLP that make every layer's
    prefixes) or the adapters (nanoft.peft.houlsby: two bottlenecks a block); float32, like LoRA's."""
    cfg, C, L = run.cfg, shape.n_embd, shape.n_layer
    heads = [ParamSpec(name, shape) for name, shape in method_of(cfg).objective.head_shapes(C).items()]
    if heads:  # the objective's own trained head (the reward model's scalar head)
        return heads
    if run.mode == "prefix":
        P, H = cfg.prefix_len, cfg.prefix_hidden
        return [ParamSpec("prefix.embedding", (P, C)), ParamSpec("prefix.hidden.weight", (H, C)),
                ParamSpec("prefix.hidden.bias", (H,)), ParamSpec("prefix.out.weight", (L * 2 * C, H)),
                ParamSpec("prefix.out.bias", (L * 2 * C,))]
    if run.mode == "adapter":
        m = cfg.adapter_size
        return [ParamSpec(f"blocks.{i}.{at}.adapter.{name}", s) for i in range(L) for at in ("attn.out_proj", "mlp.fc_out")
                for name, s in (("down.weight", (m, C)), ("down.bias", (m,)), ("up.weight", (C, m)), ("up.bias", (C,)))]
    return []


def state_bytes(p: ParamSpec, elem: int, cfg: Config) -> int:
    """Optimizer state of one trainable tensor, as the optimizer's own table entry counts it (nanoft.optim)."""
    cls = optimizer_class(cfg.optimizer)
    if p.name == "all":  # a nominal count: the rule's per-parameter bytes, no per-tensor extras
        if cls.nominal_bytes_per_param is None:
            raise ValueError(f"{cls.__name__}'s states need the matrix shapes: give --shape or dimensions")
        return math.ceil(p.numel * cls.nominal_bytes_per_param)
    return cls.tensor_state_bytes(p.shape, elem, cfg)


def static_bytes(shape: ModelShape, run: Run) -> dict[str, int]:
    """{'params', 'grads', 'states', 'states_host', 'n_params', 'n_trainable'}: the exact rows."""
    trainable, frozen = trainable_and_frozen(shape, run)
    params = frozen + sum(p.numel * e for p, e in trainable)
    grads = sum(p.numel * e for p, e in trainable)
    states = sum(state_bytes(p, e, run.cfg) for p, e in trainable)
    paged = optimizer_class(run.cfg.optimizer).paged
    return {"params": params, "grads": grads, "states": 0 if paged else states, "states_host": states if paged else 0,
            "n_params": shape.num_params(), "n_trainable": sum(p.numel for p, _ in trainable),
            "frozen_model": sum(4 * other.num_params() for other in frozen_model_shapes(run.cfg, shape))}


# --- activations: what autograd saves for backward ------------------------------------------------------

class _Saved:
    """A ledger of the tensors autograd keeps, keyed by name so that one tensor saved by several ops (the
    LayerNorm output that q, k and v all read) is counted once, as memory is. Parameters cost nothing here."""

    def __init__(self, run: Run, shape: ModelShape):
        self.run, self.shape = run, shape
        self.bytes: dict[str, int] = {}
        self.N = run.cfg.batch_size * run.cfg.block_size  # tokens per micro-batch
        self.autocast = run.act_bytes < 4

    def save(self, key: str, nbytes: int) -> None:
        self.bytes[key] = nbytes

    def mask_bytes(self, elem: int) -> int:  # dropout masks: bool on CUDA, the input's dtype on CPU
        return elem if self.run.device == "cpu" else 1

    def layernorm(self, key: str, x: tuple, w_trainable: bool) -> tuple:
        """LayerNorm/RMSNorm (fp32 under autocast): saves its input and per-token mean/rstd when it needs grad."""
        name, width, _, rg = x
        if rg or w_trainable:
            self.save(name, self.N * width * 4)
            self.save(key + ".stats", self.N * 4 * (2 if self.shape.arch == "gpt" else 1))
        return (key + ".out", width, 4, rg or w_trainable)

    def linear(self, key: str, x: tuple, fan_out: int, w_trainable: bool, w_elem: int = 4) -> tuple:
        """y = x W^T: the weight's gradient needs x, the input's gradient needs W. Under autocast each linear
        casts its input (and its weight) to the low dtype itself, so those copies are separate tensors."""
        name, width, elem, rg = x
        s = self.run.act_bytes if self.autocast else elem
        if w_trainable:
            self.save(name if s == elem else f"{key}.in_cast", self.N * width * s)
        if rg and self.autocast and w_elem != s:
            self.save(f"{key}.w_cast", width * fan_out * s)  # the cast copy of a parameter
        return (key + ".out", fan_out, s, rg or w_trainable)

    def dropout(self, key: str, x: tuple, p: float) -> tuple:
        _, width, elem, rg = x
        if p <= 0:
            return x
        if rg:
            self.save(key + ".mask", self.N * width * self.mask_bytes(elem))
        return (key + ".out", width, elem, rg)

    def pointwise(self, key: str, x: tuple, width: int | None = None) -> tuple:
        """GELU / SiLU / a product: saves its input(s) when they need grad."""
        name, w, elem, rg = x
        if rg:
            self.save(name, self.N * w * elem)
        return (key + ".out", width or w, elem, rg)


def _lora_linear(led: _Saved, key: str, x: tuple, fan_out: int, target: str, trainable_base: bool) -> tuple:
    """A block linear: plain, or wrapped by LoRA (frozen base + dropout -> A -> B), as nanoft.peft.lora runs it."""
    run = led.run
    if run.mode == "qlora":  # Linear4bit's autograd Function saves nothing: backward dequantizes W again
        out = (key + ".out", fan_out, run.act_bytes, x[3])
    else:
        out = led.linear(key, x, fan_out, trainable_base)
    if run.mode not in ("lora", "qlora") or target not in run.cfg.lora_targets:
        return out
    d = led.dropout(key + ".lora_drop", x, run.cfg.lora_dropout)
    h = led.linear(key + ".lora_A", d, run.cfg.lora_r, True, run.adapter_bytes)
    led.linear(key + ".lora_B", h, fan_out, True, run.adapter_bytes)
    return out[:3] + (True,)


def _adapter(led: _Saved, key: str, y: tuple) -> tuple:
    """Houlsby's bottleneck after a sublayer's projection (nanoft.peft.houlsby): y + up(gelu(down(y)))."""
    if led.run.mode != "adapter":
        return y
    h = led.linear(key + ".down", y, led.run.cfg.adapter_size, True, led.run.adapter_bytes)
    g = led.pointwise(key + ".gelu", h)
    led.linear(key + ".up", g, y[1], True, led.run.adapter_bytes)
    return (key + ".out",) + y[1:3] + (True,)


def _block(led: _Saved, i: int, x: tuple) -> tuple:
    """One block's saved tensors, op by op, following nanoft.model.gpt.Block.forward (LLaMA: its usual layout)."""
    shape, run = led.shape, led.run
    full = run.mode == "full"
    C, nh, T = shape.n_embd, shape.n_head, run.cfg.block_size
    kv = shape.kv_heads * (C // nh)
    p = run.cfg.dropout
    b = f"b{i}."
    h = led.layernorm(b + "ln_1", x, run.norms_trainable)
    q = _lora_linear(led, b + "q", h, C, "q_proj", full)
    k = _lora_linear(led, b + "k", h, kv, "k_proj", full)
    v = _lora_linear(led, b + "v", h, kv, "v_proj", full)
    if shape.arch == "llama":  # RoPE writes rotated copies of q and k: those are what attention saves
        q, k = (b + "q_rot",) + q[1:], (b + "k_rot",) + k[1:]
    s = q[2]
    P = run.cfg.prefix_len if run.mode == "prefix" else 0  # prefix tuning: P more keys and values, which train
    rg = q[3] or k[3] or v[3] or P > 0
    if rg and (p == 0 or run.device != "cpu"):  # flash / memory-efficient SDPA: q, k, v, out, logsumexp
        for t, extra in ((q, 0), (k, P), (v, P)):
            led.save(t[0], (led.N + run.cfg.batch_size * extra) * t[1] * s)
        if P:  # the widened mask (SDPA makes it an additive float tensor) and this layer's tanh(W_1 E + b_1)
            led.save(b + "prefix.mask", T * (T + P) * s)
            led.save(b + "prefix.hidden", P * run.cfg.prefix_hidden * s)
        led.save(b + "sdpa.lse", led.N * nh * 4)
        led.save(b + "sdpa.out", led.N * C * s)
        y = (b + "sdpa.out", C, s, True)
    elif rg:  # dropout on CPU takes the math path: copies of q, k, v and the (T x T) attention, its mask
        B = run.cfg.batch_size
        led.save(b + "sdpa.qkv", led.N * (C + 2 * kv) * s)
        led.save(b + "sdpa.attn", 2 * B * nh * T * (T + P) * s + B * nh * T * (T + P) * led.mask_bytes(s))
        y = (b + "sdpa.y", C, s, True)
    else:
        y = (b + "sdpa.y", C, s, False)
    y = _adapter(led, b + "attn_adapter", _lora_linear(led, b + "out", y, C, "out_proj", full))
    y = led.dropout(b + "resid_drop", y, p)
    x = (b + "x1", C, 4, x[3] or y[3])  # the residual stream stays fp32
    h = led.layernorm(b + "ln_2", x, run.norms_trainable)
    if shape.arch == "gpt":
        u = _lora_linear(led, b + "fc_in", h, shape.ffn, "fc_in", full)
        g = led.pointwise(b + "gelu", u)
    else:  # SwiGLU: down(silu(gate(h)) * up(h))
        gate = _lora_linear(led, b + "gate", h, shape.ffn, "fc_in", full)
        up = _lora_linear(led, b + "up", h, shape.ffn, "fc_in", full)
        g = led.pointwise(b + "silu", gate)
        led.pointwise(b + "mul_up", up)
        g = led.pointwise(b + "mul", g)
    y = _adapter(led, b + "mlp_adapter", _lora_linear(led, b + "fc_out", g, C, "fc_out", full))
    y = led.dropout(b + "mlp_drop", y, p)
    return (f"b{i + 1}.x", C, 4, x[3] or y[3])


def activation_bytes(shape: ModelShape, run: Run) -> dict[str, int]:
    """Bytes autograd saves for backward in one micro-batch, from nanoft.model.gpt.GPT.forward:

        embeddings   token ids (and position ids) for the embedding's gradient; the dropout mask
        per block    LayerNorm inputs and mean/rstd; the linear layers' inputs (autocast: bf16 copies, one per
                     linear, and bf16 copies of the weights); q, k, v, the attention output and its logsumexp;
                     the MLP input and GELU's input and output; LoRA's dropped input and rank-r bottleneck
        head         ln_f's input, lm_head's input, the fp32 log-softmax of the logits (cross-entropy), targets

    Frozen paths save less: a linear whose weight is frozen saves only its (parameter) weight, and nothing
    upstream of the first trainable tensor needs grad at all. With gradient checkpointing the forward keeps
    only each block's input, and backward recomputes one block at a time: its saved tensors come back
    (`recompute`) while the others stay as inputs. Returns {'forward', 'per_block', 'recompute', 'peak'}."""
    if shape.arch == "nominal":
        return {"forward": 0, "per_block": 0, "recompute": 0, "peak": 0}
    led = _Saved(run, shape)
    full = run.mode == "full"
    C, T = shape.n_embd, run.cfg.block_size
    if full:
        led.save("idx", led.N * 8)
        if shape.arch == "gpt":
            led.save("pos", T * 8)
    x = led.dropout("emb_drop", ("b0.x", C, 4, full), run.cfg.dropout if shape.arch == "gpt" else 0.0)
    x = ("b0.x",) + x[1:]
    ckpt = run.cfg.gradient_checkpointing
    blocks = []
    for i in range(shape.n_layer):
        before = dict(led.bytes)
        x_in = x
        x = _block(led, i, x)
        added = {k: v for k, v in led.bytes.items() if k not in before}
        blocks.append(sum(v for k, v in added.items() if k != x_in[0]))
        if ckpt:  # forget the block's own tensors; keep its input (checkpoint saves it whatever it needs)
            led.bytes = before
            led.save(x_in[0], led.N * C * 4)
    h = led.layernorm("ln_f", x, run.norms_trainable)
    # the chunked loss (nanoft.model.chunked_loss) works out both gradients during forward and keeps only them, never
    # the logits: dL/dh at h's dtype (fp32 after ln_f) and, when the head trains, dL/dW in fp32; and the targets
    if h[3]:
        led.save("loss.grad_hidden", led.N * C * 4)
    if full:
        led.save("loss.grad_weight", shape.vocab_size * C * 4)
    led.save("targets", led.N * 8)
    forward = sum(led.bytes.values())
    recompute = max(blocks) if ckpt else 0
    return {"forward": forward, "per_block": max(blocks), "recompute": recompute, "peak": forward + recompute}


# --- inference: the weights of a quantized checkpoint (python -m nanoft quantize) ------------------------

def inference_bytes(shape: ModelShape, fmt: str, group_size: int = 128) -> int:
    """Bytes of the weights a model holds for inference (and its checkpoint stores) when the block linears are in
    `fmt` ("float32", "bfloat16", or a name in nanoft.quant.FORMATS: int8, int4 with group_size, nf4 in blocks of
    64, double quantized) and everything else (embeddings, norms, biases, an untied head) is float32, as
    python -m nanoft quantize leaves it. Each format's class states its own bytes."""
    total = 0
    for p in param_specs(shape):
        if not (p.target and len(p.shape) == 2) or fmt == "float32":
            total += 4 * p.numel
        elif fmt == "bfloat16":
            total += 2 * p.numel
        elif fmt == "nf4":
            total += nf4_bytes(p.numel, 64, True)
        else:
            out_f, in_f = p.shape
            total += FORMATS[fmt].weight_bytes(in_f, out_f, **({"group_size": group_size} if fmt == "int4" else {}))
    return total
