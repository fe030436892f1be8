"""The one typed configuration of a run, loaded from a Python file plus `--key=value` overrides.

A config file is ordinary Python that defines `config = Config(...)`; it is run with `runpy` and its
`config` is returned (never exec'd into our globals). Overrides on the command line are parsed with
`ast.literal_eval` and checked against the field's type, so a typo or a wrong type fails at once with
a one-line error instead of silently training the wrong model.

    cfg = load_config("configs/tiny.py", ["--lr=3e-4", "--optimizer=adamw8bit"])
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import math
import runpy
import tokenize
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what was expected."""


# keys whose value must be one of a fixed set; checked on every Config construction
CHOICES = {
    "device": ("auto", "cpu", "cuda", "mps"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "finetune_weights": ("full", "lora", "qlora"),
    "rl_stop": ("newline", "eos"),
    "kl_estimator": ("k1", "k3"),
}
# objectives of their own (nanoft/objectives/dpo.py, reward.py, distill.py, ppo.py, grpo.py); DPO, PPO and GRPO may
# train LoRA/QLoRA adapters instead
OBJECTIVE_FINETUNES = ("dpo", "reward", "distill", "ppo", "grpo")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")


@dataclass(frozen=True)
class Config:
    # --- I/O ---
    out_dir: str = "out"  # where checkpoints and metrics.jsonl are written
    init_from: str = "scratch"  # "scratch", "resume" (latest checkpoint in out_dir), a nanoft checkpoint dir, or a GPT-2 model.safetensors path
    overwrite: bool = False  # start a new run in an out_dir that holds a checkpoint (it is replaced at the first save)
    max_iters: int = 1000  # optimizer steps to train for
    log_interval: int = 10  # write metrics every this many steps
    eval_interval: int = 200  # estimate validation loss every this many steps (and at the end)
    eval_iters: int = 20  # batches averaged for each validation loss estimate
    save_interval: int = 500  # checkpoint every this many steps (and at the end, and on Ctrl-C)
    wandb_log: bool = False  # also log to Weights & Biases
    wandb_project: str = "nanoft"  # wandb project name
    wandb_run_name: str = ""  # wandb run name; empty lets wandb pick
    # --- data ---
    dataset: str = "shakespeare"  # folder under data/ holding train.bin and val.bin (the default is prepared on first use)
    batch_size: int = 8  # sequences per micro-batch
    block_size: int = 256  # tokens per sequence (context length)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    # --- model ---
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 384  # residual stream width
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    dropout: float = 0.0  # dropout probability (0 for pretraining, 0.1 is typical for fine-tuning)
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2 has
    tie_embeddings: bool = True  # the head's weight is the token embedding (GPT-2); False: a separate lm_head
    # --- optimizer and schedule ---
    optimizer: str = "adamw"  # a name in nanoft/optim/__init__.py's table: adamw, adamw8bit, paged_adamw, ...
    lr: float = 6e-4  # peak learning rate, reached after warmup
    min_lr: float = 6e-5  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # decoupled weight decay, applied to 2-D weights only
    beta1: float = 0.9  # Adam first-moment decay
    beta2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam denominator epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss or gradient (each is skipped)
    min_8bit_size: int = 4096  # 8-bit optimizers keep 32-bit states for tensors smaller than this
    page_size: int = 1 << 20  # elements per chunk paged between host and device by paged optimizers
    adafactor_relative_step: bool = False  # Adafactor computes its own step size (lr is then ignored)
    adafactor_scale_parameter: bool = False  # scale the step by the parameter's RMS: meant for relative_step (with the schedule's lr it shrinks steps ~50x)
    adafactor_warmup_init: bool = False  # Adafactor's relative step warms up from 1e-6 (needs relative_step)
    # --- fine-tuning ---
    finetune: str = "none"  # a name in nanoft/objectives/__init__.py's table: none (pretraining), full, lora, qlora, ...
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator: the update is (alpha / r) * B @ A
    lora_dropout: float = 0.05  # dropout on the LoRA path's input
    lora_targets: tuple = ("q_proj", "v_proj")  # linear layers that get adapters (see LORA_TARGETS)
    lora_train_norms: bool = False  # LoRA/QLoRA: the LayerNorms' gains and biases train too (2*n_embd each)
    nf4_blocksize: int = 64  # QLoRA: elements per NF4 quantization block
    double_quant: bool = True  # QLoRA: quantize the per-block absmax values to 8 bits too
    finetune_weights: str = "full"  # dpo, ppo, grpo: which weights train, full | lora | qlora (the lora_* keys apply)
    dpo_beta: float = 0.1  # DPO: how far the policy may move from the reference (small: far)
    preference_data: str = ""  # dpo, reward: JSONL of {"prompt","chosen","rejected"}; empty uses the plays' set
    teacher_from: str = ""  # distill: the teacher's checkpoint dir (a full model of any shape, same vocabulary)
    distill_alpha: float = 0.5  # distill: weight of the teacher's soft targets; 1 - alpha on the true tokens
    distill_temperature: float = 2.0  # distill: softmax temperature T of both teacher and student in the KL term
    reward_from: str = ""  # ppo, grpo: the reward model, a finetune=reward checkpoint dir
    rl_samples: int = 1  # ppo, grpo: responses sampled per prompt in a rollout (grpo: the group size G, at least 2)
    rl_epochs: int = 4  # ppo, grpo: passes over each rollout (1: the ratio stays 1, plain policy gradient)
    rl_minibatches: int = 1  # ppo, grpo: optimizer steps per pass; a rollout serves rl_epochs * rl_minibatches steps
    rl_max_new_tokens: int = 24  # ppo, grpo: the longest response sampled (prompt + response also fit block_size)
    rl_temperature: float = 0.7  # ppo, grpo: sampling temperature; the policy trained is softmax(logits / T)
    rl_stop: str = "newline"  # ppo, grpo: a response ends at a token holding a newline, or at <|endoftext|> only (eos)
    rl_no_stop_penalty: float = 1.0  # ppo, grpo: subtracted from the score of a response that never stops
    rl_clip: float = 0.2  # ppo, grpo: eps of the clipped ratio, clip(pi / pi_old, 1 - eps, 1 + eps)
    reward_norm: bool = False  # ppo, grpo: scores normalised to mean 0, std 1 on the reference's own samples
    kl_coef: float = 0.05  # ppo: beta of the per-token KL penalty in the reward; grpo: beta of the k3 KL in the loss
    kl_estimator: str = "k1"  # ppo: the per-token KL in the reward: k1 = log(pi/pi_ref), k3 = r - 1 - log r
    kl_target: float = 0.0  # ppo: > 0 adapts kl_coef toward this KL per response (Ziegler et al. 2019); 0 keeps it
    kl_horizon: int = 10000  # ppo: the adaptive KL controller's horizon, in sampled responses
    vf_coef: float = 0.1  # ppo: weight of the value loss
    vf_clip: float = 0.2  # ppo: the value loss clips the value's move from its rollout value to +-vf_clip
    gae_gamma: float = 1.0  # ppo: discount
    gae_lambda: float = 0.95  # ppo: GAE's lambda
    prefix_len: int = 10  # prefix tuning: trained key/value positions before the sequence, in every layer
    prefix_hidden: int = 512  # prefix tuning: hidden width of the MLP that produces the prefixes while training
    adapter_size: int = 64  # adapters: bottleneck width m of each adapter (2*m*n_embd + m + n_embd numbers)
    sft_data: str = ""  # fine-tuning data: JSONL of {"prompt","response"}; empty uses the embedded speaker task
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    # --- system ---
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    dtype: str = "auto"  # autocast dtype: auto is bfloat16 on CUDA when supported, float32 elsewhere
    compile: bool | str = "auto"  # torch.compile the model: True, False, or auto (when the run is long enough to repay it; nanoft/run/precision.py)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer states (FSDP2)
    dist_timeout: int = 600  # under torchrun: seconds a collective waits for the other ranks before failing
    seed: int = 1337  # seeds the model init and the batch order

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(Config)
        for f in dataclasses.fields(self):
            _check_type(f.name, hints[f.name], getattr(self, f.name))
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"config key 'lora_targets' has unknown {bad}; valid targets: {', '.join(LORA_TARGETS)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"config key 'n_embd' ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Every number in range, so a typo fails here in one line rather than as NaN or a crash mid-run."""
        for key in ("max_iters", "batch_size", "block_size", "grad_accum", "eval_iters", "log_interval",
                    "eval_interval", "save_interval", "n_layer", "n_head", "n_embd", "vocab_size", "lora_r",
                    "max_bad_steps", "dist_timeout", "min_8bit_size", "page_size", "nf4_blocksize",
                    "prefix_len", "prefix_hidden", "adapter_size", "rl_samples", "rl_epochs", "rl_minibatches",
                    "rl_max_new_tokens", "kl_horizon"):
            _check(key, getattr(self, key) >= 1, getattr(self, key), "at least 1")
        _check("lr", math.isfinite(self.lr) and self.lr > 0, self.lr, "a finite number > 0")
        _check("min_lr", 0 <= self.min_lr <= self.lr, self.min_lr, f"between 0 and lr ({self.lr})")
        _check("warmup_iters", self.warmup_iters >= 0, self.warmup_iters, "at least 0")
        for key in ("dropout", "lora_dropout", "beta1", "beta2"):
            _check(key, 0 <= getattr(self, key) < 1, getattr(self, key), "in [0, 1)")
        for key in ("weight_decay", "grad_clip"):
            _check(key, 0 <= getattr(self, key) < math.inf, getattr(self, key), "a finite number >= 0")
        _check("eps", 0 < self.eps < 1, self.eps, "in (0, 1)")
        _check("compile", self.compile in (True, False, "auto"), self.compile, "True, False or auto")
        _check("lora_alpha", 0 < self.lora_alpha < math.inf, self.lora_alpha, "a finite number > 0")
        _check("seed", 0 <= self.seed < 2**63, self.seed, "in [0, 2**63)")
        _check("dpo_beta", 0 < self.dpo_beta < math.inf, self.dpo_beta, "a finite number > 0")
        _check("distill_alpha", 0 <= self.distill_alpha <= 1, self.distill_alpha, "in [0, 1]")
        _check("distill_temperature", 0 < self.distill_temperature < math.inf, self.distill_temperature,
               "a finite number > 0")
        for key in ("rl_temperature", "vf_clip"):
            _check(key, 0 < getattr(self, key) < math.inf, getattr(self, key), "a finite number > 0")
        for key in ("rl_no_stop_penalty", "kl_coef", "kl_target", "vf_coef"):
            _check(key, 0 <= getattr(self, key) < math.inf, getattr(self, key), "a finite number >= 0")
        _check("rl_clip", 0 < self.rl_clip < 1, self.rl_clip, "in (0, 1)")
        for key in ("gae_gamma", "gae_lambda"):
            _check(key, 0 <= getattr(self, key) <= 1, getattr(self, key), "in [0, 1]")
        for key in ("out_dir", "init_from", "dataset"):
            _check(key, bool(getattr(self, key).strip()), getattr(self, key), "not empty")

    @property
    def lora_kind(self) -> str:
        """"lora" or "qlora" when the run trains LoRA adapters (finetune=lora/qlora, or dpo with those
        finetune_weights), else "": the one test for "this run's weights are a base plus adapters"."""
        kind = self.finetune_weights if self.finetune_weights != "full" else self.finetune  # nanoft.objectives.method_of
        return kind if kind in ("lora", "qlora") else ""  # lets finetune_weights differ from full only where it applies

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Config:
        """A Config from a checkpoint's JSON: lists back to tuples; unknown keys are an error."""
        for key in d:
            if key not in field_names():
                raise unknown_key_error(key)
        return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _check(key: str, ok: bool, value: object, expected: str) -> None:
    if not ok:  # NaN fails every comparison, so it lands here too
        raise ConfigError(f"config key '{key}' must be {expected}; got {value!r}")


def _check_type(key: str, expected: type, value: object) -> None:
    if expected is float and type(value) is int:
        return  # 3 is a fine float
    if expected is tuple:
        if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            return
    elif type(value) is expected or type(value) in typing.get_args(expected):  # get_args: a union's members
        return
    name = "tuple of str" if expected is tuple else " or ".join(t.__name__ for t in typing.get_args(expected) or [expected])
    raise ConfigError(f"config key '{key}' expects {name}, got {value!r} ({type(value).__name__})")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def unknown_key_error(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, field_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else "; see --help for the valid keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def parse_overrides(argv: list[str]) -> dict:
    """['--lr=3e-4', '--compile=True'] -> {'lr': 0.0003, 'compile': True}; strings may be bare."""
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key not in field_names():
            raise unknown_key_error(key)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as --optimizer=adamw8bit is a string
        if isinstance(value, list):
            value = tuple(value)
        overrides[key] = value
    return overrides


def load_config(path: str, argv: list[str]) -> Config:
    """Run the config file, take its `config`, and apply the `--key=value` overrides in argv."""
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        namespace = runpy.run_path(path)
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: syntax error: {e.msg}") from None
    except ConfigError as e:  # Config(lr=-1) inside the file
        raise ConfigError(f"{path}: {e}") from None
    except TypeError as e:  # Config(unknown=...) inside the file
        bad = str(e).split("'")[1] if "unexpected keyword argument '" in str(e) else ""
        raise (unknown_key_error(bad) if bad else ConfigError(f"{path}: {e}")) from None
    except Exception as e:  # noqa: BLE001 (whatever the file's own code raised: name its line, not a traceback)
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == Path(path).resolve()]
        raise ConfigError(f"{path}, line {lines[-1] if lines else '?'}: {type(e).__name__}: {e}") from None
    config = namespace.get("config")
    if not isinstance(config, Config):
        raise ConfigError(f"{path} must define `config = Config(...)`")
    return dataclasses.replace(config, **parse_overrides(argv))


def describe() -> str:
    """The --help text: every key with its type, default and the comment written beside it."""
    comments = {}
    source = inspect.getsource(Config)
    last_name = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and last_name is None:
            last_name = tok.string
        elif tok.type == tokenize.COMMENT and last_name:
            comments[last_name] = tok.string.lstrip("# ")
        if tok.type == tokenize.NEWLINE:
            last_name = None
    hints = typing.get_type_hints(Config)
    lines = ["config keys (set in a config file, or override with --key=value):"]
    for f in dataclasses.fields(Config):
        kind = "tuple" if hints[f.name] is tuple else getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  --{f.name}={f.default!r}  ({kind})  {comments.get(f.name, '')}")
    return "\n".join(lines)
