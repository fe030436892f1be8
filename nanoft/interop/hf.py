"""Hugging Face's GPT-2 layout, both ways: config.json to a nanoft Config, model.safetensors to our weights
and back, and GPT-2 models fetched from the Hub by name (`--init_from=gpt2`).

transformers' GPT2LMHeadModel and nanoft's GPT compute the same function; only names and shapes differ.
GPT-2's linear layers are `Conv1D`, y = x @ W + b with W stored (in, out); ours are nn.Linear, y = x @ W.T + b
with W (out, in). So reading transposes every Conv1D weight and cuts the fused c_attn in three; writing
joins and transposes back. The same numbers move, nothing is approximated:

    transformers                                           nanoft
    transformer.wte, wpe, ln_f                             wte, wpe, ln_f
    transformer.h.<i>.ln_1, ln_2                           blocks.<i>.ln_1, ln_2
    transformer.h.<i>.attn.c_attn   W (C, 3C) = [q | k | v]    blocks.<i>.attn.q_proj, k_proj, v_proj   (C, C) each
    transformer.h.<i>.attn.c_proj                          blocks.<i>.attn.out_proj
    transformer.h.<i>.mlp.c_fc, mlp.c_proj                 blocks.<i>.mlp.fc_in, fc_out
    lm_head (absent when tied to wte)                      lm_head (wte itself unless tie_embeddings=False)

config.json gives the shape: n_layer, n_head, n_embd, vocab_size, n_positions (caps block_size),
tie_word_embeddings. A model's shape is the file's, whatever the run's config says (the differences are
printed), as nanoGPT's `from_pretrained` and litgpt do: a user names the model, not its dimensions. Settings
nanoft does not compute (another LayerNorm epsilon or activation, attention scaled by the layer index,
cross-attention, an MLP other than 4 * n_embd wide) are refused in one line instead of computing garbage.
reorder_and_upcast_attn is accepted: it only reorders the same attention maths and runs it in float32.

By name: `--init_from=gpt2` (gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or any owner/name of a GPT-2
model) downloads config.json and model.safetensors from <endpoint>/<name>/resolve/main/ with nanoft.data.download
(progress, resume, the sha256 the Hub publishes for the weights) into data/.cache/hf/<owner>--<name>/, once.
NANOFT_HF_ENDPOINT replaces https://huggingface.co (a mirror; the tests' loopback server); NANOFT_OFFLINE=1
uses the cache only. A name is something that is not a local path: `out/tiny` is a path when ./out exists.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from nanoft.config import Config
from nanoft.data import tokens
from nanoft.data.download import download, published_sha256
from nanoft.run import checkpoint
from nanoft.run.distributed import launched_rank

ENDPOINT = "https://huggingface.co"  # NANOFT_HF_ENDPOINT replaces it
WEIGHTS, CONFIG = "model.safetensors", "config.json"
# transformers' GPT2Config defaults: a config.json may leave any of these out
GPT2_DEFAULTS = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024,
                 "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # GELU's tanh approximation, which nanoft computes
# settings with one value nanoft computes, and what another value would mean
FIXED = {"scale_attn_weights": (True, "attention scores not divided by sqrt(head size)"),
         "scale_attn_by_inverse_layer_idx": (False, "attention scores also divided by the layer index"),
         "add_cross_attention": (False, "cross-attention to an encoder")}
# each linear layer of a block, by its path in our block -> the GPT-2 module that holds it (q, k, v: c_attn's rows)
GPT2_MODULES = {"attn.q_proj": "attn.c_attn", "attn.k_proj": "attn.c_attn", "attn.v_proj": "attn.c_attn",
                "attn.out_proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}
ONE_TO_ONE = [(ours, theirs) for ours, theirs in GPT2_MODULES.items() if theirs != "attn.c_attn"]
BUFFERS = (".attn.bias", ".attn.masked_bias")  # old files store the causal mask; it is not a weight


# --- config.json ----------------------------------------------------------------------------------------

def read_config(path: str | Path) -> dict:
    """config.json with transformers' defaults filled in, refused in one line if nanoft cannot compute it."""
    try:
        hf = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        got = hf.get("model_type") if isinstance(hf, dict) else None
        raise ValueError(f"{path}: model_type {got!r} is not 'gpt2'; nanoft loads GPT-2-architecture models only")
    hf = {**GPT2_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if hf["layer_norm_epsilon"] != 1e-5:
        raise ValueError(f"{path}: layer_norm_epsilon={hf['layer_norm_epsilon']} is not supported "
                         "(nanoft's LayerNorm uses 1e-5)")
    if hf["activation_function"] not in ACTIVATIONS:
        raise ValueError(f"{path}: activation_function={hf['activation_function']!r} is not supported "
                         f"(nanoft computes GELU's tanh approximation: {', '.join(ACTIVATIONS)})")
    if hf.get("n_inner", 4 * hf["n_embd"]) != 4 * hf["n_embd"]:
        raise ValueError(f"{path}: n_inner={hf['n_inner']} is not supported "
                         f"(nanoft's MLP is 4 * n_embd = {4 * hf['n_embd']} wide)")
    for key, (value, meaning) in FIXED.items():
        if hf.get(key, value) != value:
            raise ValueError(f"{path}: {key}={hf[key]} is not supported ({meaning})")
    return hf


def shape_of(hf: dict, cfg: Config) -> dict:
    """The Config keys a config.json decides; block_size is the run's, capped at the model's positions."""
    return {"n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": hf["n_embd"], "vocab_size": hf["vocab_size"],
            "block_size": min(cfg.block_size, hf["n_positions"]), "bias": True,
            "tie_embeddings": bool(hf["tie_word_embeddings"])}


def gpt2_config(cfg: Config) -> dict:
    """The config.json that makes transformers build the model a nanoft Config describes."""
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, where the vocabulary has it
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "add_cross_attention": False, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02,
            "bos_token_id": eot, "eos_token_id": eot, "use_cache": True, "dtype": "float32"}


# --- names, paths and the cache -------------------------------------------------------------------------

def is_hub_name(source: str) -> bool:
    """"gpt2" or "owner/name" that is not a local path (nor under an existing local folder)."""
    if source in ("scratch", "resume") or Path(source).exists() or source.endswith(".safetensors"):
        return False
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", source):
        return False
    return "/" not in source or not Path(source.split("/")[0]).is_dir()


def is_hf_source(source: str) -> bool:
    """A GPT-2 in Hugging Face's layout: a model.safetensors, a folder holding one (not a nanoft checkpoint), or
    a Hub name."""
    path = Path(source)
    return (source.endswith(".safetensors") or is_hub_name(source)
            or (path.is_dir() and (path / WEIGHTS).is_file() and not checkpoint.exists(path)))


def weights_path(source: str) -> Path | None:
    """The model.safetensors a Hugging Face source means (a Hub name is fetched if not cached), or None for
    anything else (scratch, a nanoft checkpoint)."""
    if not is_hf_source(source):
        return None
    if source.endswith(".safetensors"):
        return Path(source)
    return Path(source) / WEIGHTS if Path(source).is_dir() else fetch(source)


def fetch(name: str) -> Path:
    """Hub model `name`'s model.safetensors in the cache, with its config.json beside it (downloaded once)."""
    folder = tokens.cache_dir() / "hf" / name.replace("/", "--")
    if all((folder / f).is_file() for f in (CONFIG, WEIGHTS)):
        return folder / WEIGHTS
    if os.environ.get("NANOFT_OFFLINE", "") not in ("", "0"):
        raise ValueError(f"{name} is not a local path, nor cached in {folder} (NANOFT_OFFLINE forbids downloading it)")
    endpoint = os.environ.get("NANOFT_HF_ENDPOINT", ENDPOINT).rstrip("/")
    for file in (CONFIG, WEIGHTS):  # config.json first: a model nanoft cannot run is refused before the big file
        url = f"{endpoint}/{name}/resolve/main/{file}"
        sha256 = published_sha256(url) if file == WEIGHTS else None  # the Hub publishes it for LFS files only
        if file == WEIGHTS and sha256 is None and launched_rank() == 0:
            print(f"{url}: no published sha256; the download cannot be checked", file=sys.stderr)
        try:
            download(url, folder / file, sha256)
        except RuntimeError as e:
            raise ValueError(f"{name}: no such local checkpoint or file, and no GPT-2 of that name on the Hub "
                             f"({e})") from None
        if file == CONFIG:
            read_config(folder / CONFIG)
    return folder / WEIGHTS


def resolve(cfg: Config, announce: bool = True) -> Config:
    """cfg with a Hugging Face base made concrete: init_from names the weights file (a Hub name is fetched)
    and the shape is the one config.json says, the differences printed (announce). With init_from=resume,
    the shape of the run's recorded base. Any other cfg is returned as it is."""
    source = cfg.init_from
    if source == "resume":
        source = checkpoint.read_meta(cfg.out_dir)["base_from"] if checkpoint.exists(cfg.out_dir) else "scratch"
    path = weights_path(source)
    if path is None:
        return cfg
    config_json = path.with_name(CONFIG)
    if config_json.is_file():
        shape = shape_of(read_config(config_json), cfg)
    else:  # a bare weights file: the config's shape (checked on loading); the file says whether the head is tied
        shape = {"tie_embeddings": not has_own_head(path)}
    changed = [f"{k} {getattr(cfg, k)!r} -> {v!r}" for k, v in shape.items() if getattr(cfg, k) != v]
    if changed and announce and launched_rank() == 0:
        where = config_json if config_json.is_file() else path
        print(f"{source}: the model's shape is {where}'s: {', '.join(changed)}", file=sys.stderr)
    return dataclasses.replace(cfg, **shape, init_from=cfg.init_from if cfg.init_from == "resume" else str(path))


# --- model.safetensors -----------------------------------------------------------------------------------

def has_own_head(path: str | Path) -> bool:
    """Whether a GPT-2 weights file holds an lm_head.weight that is not its wte (an untied head)."""
    try:
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
            wte = next((n for n in ("transformer.wte.weight", "wte.weight") if n in names), None)
            if "lm_head.weight" not in names:
                return False
            return wte is None or not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor(wte))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read GPT-2 weights from {path}: {e}") from None


def gpt2_state_dict(path: str | Path, cfg: Config) -> dict[str, Tensor]:
    """Read a Hugging Face GPT-2 model.safetensors (checked against the config.json beside it, if any) and
    return it in our module names, for GPT(cfg)."""
    config_json = Path(path).with_name(CONFIG)
    if config_json.is_file():
        for key, value in shape_of(read_config(config_json), cfg).items():
            if key != "block_size" and getattr(cfg, key) != value:
                raise ValueError(f"{config_json} has {key}={value!r} but the config says {key}={getattr(cfg, key)!r}")
    try:
        hf = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read GPT-2 weights from {path}: {e}") from None
    hf = {k.removeprefix("transformer."): v for k, v in hf.items() if not k.endswith(BUFFERS)}
    C = cfg.n_embd
    if "wte.weight" not in hf or hf["wte.weight"].shape[1] != C:
        raise ValueError(f"{path} is not a GPT-2 checkpoint with n_embd={C}")
    n_layer = 1 + max((int(k.split(".")[1]) for k in hf if k.startswith("h.")), default=-1)
    if n_layer != cfg.n_layer:
        raise ValueError(f"{path} has {n_layer} layers but the config says n_layer={cfg.n_layer}")
    if hf["wpe.weight"].shape[0] < cfg.block_size:
        raise ValueError(f"{path} has {len(hf['wpe.weight'])} positions; set block_size <= {len(hf['wpe.weight'])}")
    sd = {"wte.weight": hf.pop("wte.weight"), "wpe.weight": hf.pop("wpe.weight")[: cfg.block_size],  # a prefix
          "ln_f.weight": hf.pop("ln_f.weight"), "ln_f.bias": hf.pop("ln_f.bias")}
    for i in range(n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = hf.pop(h + ln + ".weight"), hf.pop(h + ln + ".bias")
        q, k, v = hf.pop(h + "attn.c_attn.weight").t().split(C, dim=0)  # (3C, C) -> three (C, C)
        qb, kb, vb = hf.pop(h + "attn.c_attn.bias").split(C)
        for name, w, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            sd[b + f"attn.{name}.weight"], sd[b + f"attn.{name}.bias"] = w, bias
        for ours, theirs in ONE_TO_ONE:
            sd[b + ours + ".weight"] = hf.pop(h + theirs + ".weight").t()
            sd[b + ours + ".bias"] = hf.pop(h + theirs + ".bias")
    if sd["wte.weight"].shape[0] != cfg.vocab_size:  # padding would give unused tokens logit 0: too likely
        vocab = len(sd["wte.weight"])
        raise ValueError(f"{path} has vocab {vocab}; set vocab_size={vocab} in the config")
    head = hf.pop("lm_head.weight", None)
    if hf:
        raise ValueError(f"{path} holds weights GPT-2 does not have: {sorted(hf)[:3]}")
    if cfg.tie_embeddings:
        if head is not None and not config_json.is_file() and not torch.equal(head, sd["wte.weight"]):
            raise ValueError(f"{path} holds its own lm_head.weight (an untied head); set tie_embeddings=False")
        sd["lm_head.weight"] = sd["wte.weight"]  # tied: the same matrix under both names
    else:  # untied: the file's own head, or (a tied file fine-tuned untied) a copy of the embedding to start from
        sd["lm_head.weight"] = head if head is not None else sd["wte.weight"].clone()
    return {k: v.contiguous() for k, v in sd.items()}


def to_gpt2_state_dict(weights: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """Our float weights (GPT(cfg).state_dict() names) in transformers' GPT2LMHeadModel names and layouts.
    A model without biases (bias=False) gets zero biases: GPT-2 has them, and zero adds nothing."""
    def bias(name: str, n: int) -> Tensor:
        return weights[name] if name in weights else torch.zeros(n)

    C = cfg.n_embd
    hf = {"transformer.wte.weight": weights["wte.weight"], "transformer.wpe.weight": weights["wpe.weight"],
          "transformer.ln_f.weight": weights["ln_f.weight"], "transformer.ln_f.bias": bias("ln_f.bias", C)}
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            hf[h + ln + ".weight"], hf[h + ln + ".bias"] = weights[b + ln + ".weight"], bias(b + ln + ".bias", C)
        qkv = [b + f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        hf[h + "attn.c_attn.weight"] = torch.cat([weights[p + ".weight"] for p in qkv]).t()  # (3C, C) -> (C, 3C)
        hf[h + "attn.c_attn.bias"] = torch.cat([bias(p + ".bias", C) for p in qkv])
        for ours, theirs in ONE_TO_ONE:
            w = weights[b + ours + ".weight"]
            hf[h + theirs + ".weight"], hf[h + theirs + ".bias"] = w.t(), bias(b + ours + ".bias", w.shape[0])
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = weights["lm_head.weight"]
    return {k: v.detach().float().contiguous() for k, v in hf.items()}


def write_gpt2(folder: str | Path, weights: dict[str, Tensor], cfg: Config) -> Path:
    """folder/config.json + folder/model.safetensors: what GPT2LMHeadModel.from_pretrained(folder) reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(to_gpt2_state_dict(weights, cfg), str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(gpt2_config(cfg), indent=2) + "\n")
    return folder
