"""nanoft to Hugging Face and back: a checkpoint out to transformers, a LoRA run out to peft, a peft LoRA adapter in.

    python -m nanoft export out/tiny --to out/tiny-hf          # a full model: config.json + model.safetensors
    python -m nanoft export out/lora --to out/lora-hf          # a LoRA run: a peft adapter, its base in base/
    python -m nanoft export path/to/peft-adapter --to out/lora-in [--base gpt2]   # a peft LoRA adapter -> nanoft
    python -m nanoft export out/tiny --to tiny-q8_0.gguf --type q8_0   # llama.cpp's GGUF: f16, q8_0 or q4_0

    model = GPT2LMHeadModel.from_pretrained("out/tiny-hf")                       # the same logits as nanoft
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained("out/lora-hf/base"), "out/lora-hf")

A --to ending in .gguf writes one GGUF file for llama.cpp and ollama (layout: nanoft/interop/gguf.py); a LoRA
or QLoRA run is merged into its base first, as `python -m nanoft merge` merges it, since llama.cpp runs one model.

The base of a LoRA run is written with its full context (all of its positions). A QLoRA run's base is written as
the adapter saw it: each block linear NF4-quantized and dequantized (float32), so peft over it computes what
nanoft computed, with no bitsandbytes needed.

Folding q, k, v into c_attn. nanoft adapts q_proj, k_proj and v_proj separately, each by s * B_t A_t with
A_t (r, C), B_t (C, r) and s = alpha / r. GPT-2's c_attn computes q, k and v at once, [q | k | v] = x W + b, so
its update is the three deltas stacked, (3C, C), with zero rows for a projection left alone. Stack the m adapted
projections' A's and place their B's block-diagonally (here q and v, m = 2):

    A = [A_q]   (m r, C)        B = [B_q  0  ]   (3C, m r)        s * B A = [s B_q A_q]
        [A_v]                       [0    0  ]                              [    0    ]
                                    [0    B_v]                              [s B_v A_v]

exactly the stacked deltas: the zero blocks add nothing. peft's adapter on c_attn then has rank m r, and keeps the
scale s with lora_alpha = m * alpha (its rank_pattern and alpha_pattern say so for c_attn alone). peft stores A
(rank, in) and B (out, rank) as nanoft does; fan_in_fan_out=True only transposes its merged delta for GPT-2's
Conv1D, so the tensors move as they are. out_proj, fc_in and fc_out map one to one onto attn.c_proj, mlp.c_fc
and mlp.c_proj; LayerNorms trained with lora_train_norms go in peft's modules_to_save.

Importing splits c_attn's B by rows into the three projections: each keeps all of A, s * B_t A, exact. When B is
block-structured (each column serves one projection, as an export writes it), each projection keeps only its own
columns of B and rows of A, so nanoft -> peft -> nanoft gives back the very tensors it started from.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from nanoft.config import LORA_TARGETS, Config
from nanoft.interop import hf
from nanoft.interop.gguf import TYPES, write_gguf
from nanoft.interop.pretrained import load_pretrained
from nanoft.model import GPT
from nanoft.peft.lora_model import BLOCK_LINEARS, adapter_config
from nanoft.quant.nf4 import NF4Tensor
from nanoft.run import checkpoint
from nanoft.run.adapter_base import check_adapter_base
from nanoft.run.checkpoint import CheckpointError
from nanoft.run.out_dir import check_output_dir
from nanoft.tools.merge import check_mergeable, merged_model

QKV = ("q_proj", "k_proj", "v_proj")  # the order of their rows in c_attn
GPT2_MODULE = {t: hf.GPT2_MODULES[path] for t, path in BLOCK_LINEARS.items()}  # "out_proj" -> "attn.c_proj"
PEFT = "base_model.model.transformer."  # where peft's GPT2LMHeadModel keeps GPT-2's modules
PEFT_LORA = re.compile(r"(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\."
                       r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight")
PEFT_NORM = re.compile(r"(?:base_model\.model\.)?(?:transformer\.)?(?:h\.(\d+)\.)?(ln_1|ln_2|ln_f)\.(weight|bias)")
NORMS = ("ln_1", "ln_2", "ln_f")
EXPORTED = {hf.CONFIG, hf.WEIGHTS, "generation_config.json", "adapter_config.json", "adapter_model.safetensors", "base"}


# --- out: a checkpoint to transformers, a LoRA adapter to peft ---------------------------------------------

def export(src: str, to: str, overwrite: bool = False) -> Path:
    """Write the checkpoint in `src` to the folder `to` (whole, or not at all): a full model as GPT-2, a LoRA
    run as its base (to/base/) plus a peft adapter (to/)."""
    ck = checkpoint.load(src)
    cfg = Config.from_dict(ck.config)
    to = Path(to)
    if cfg.lora_kind:
        check_adapter_base(ck, src)  # the very base the adapter was trained on, by content
        return _write_folder(to, [src, ck.base_from], overwrite, lambda tmp: _write_lora(tmp, to, ck, cfg))
    with torch.device("meta"):  # names only: no memory for the weights
        names = set(GPT(cfg).state_dict())
    if set(ck.model) != names:
        raise ValueError(f"{src} holds finetune={cfg.finetune!r} weights that GPT-2 has no place for")
    return _write_folder(to, [src], overwrite, lambda tmp: hf.write_gpt2(tmp, ck.model, cfg))


def export_gguf(src: str, to: str, type: str = "f16", overwrite: bool = False) -> Path:
    """Write the checkpoint in `src` to the file `to` as a llama.cpp gpt2 GGUF of `type` (whole, or not at all)."""
    if type not in TYPES:
        raise ValueError(f"unknown --type {type!r}; a GGUF export is one of {', '.join(TYPES)}")
    ck = checkpoint.load(src)
    cfg = Config.from_dict(ck.config)
    to = Path(to)
    check_output_dir(to, [src, ck.base_from] if cfg.lora_kind else [src], overwrite)
    if to.is_dir() or (to.exists() and not overwrite):
        raise ValueError(f"--to {to} already exists; pick another file, or --overwrite to replace it")
    if not to.parent.is_dir():
        raise ValueError(f"--to {to}: no folder {to.parent} to write it in")
    if cfg.lora_kind:  # llama.cpp runs one model: the adapter folded into its base
        check_mergeable(cfg, src)
        check_adapter_base(ck, src)
        weights = merged_model(ck, cfg, ck.base_from).state_dict()
    else:
        with torch.device("meta"):
            names = set(GPT(cfg).state_dict())
        if set(ck.model) != names:
            raise ValueError(f"{src} holds finetune={cfg.finetune!r} weights that llama.cpp's GPT-2 has no place for")
        weights = ck.model
    return write_gguf(to, weights, cfg, type, name=Path(src).resolve().name)


def _write_folder(to: Path, inputs: list[str], overwrite: bool, write) -> Path:
    """Write through `write(tmp)` into a fresh folder beside `to`, then rename it into place: never half a folder.
    --overwrite replaces an earlier export, never a folder holding anything else."""
    check_output_dir(to, inputs, overwrite)
    held = {p.name for p in to.iterdir()} if to.is_dir() else set()
    if held and not overwrite:
        raise ValueError(f"--to {to} is not empty; pick another folder, or --overwrite to replace an earlier export")
    if not held <= EXPORTED:
        raise ValueError(f"--to {to} holds other files than an export's; pick another folder")
    tmp, old = (to.with_name(f"{to.name}.{os.getpid()}.{what}") for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if to.exists():
            os.replace(to, old)
        os.replace(tmp, to)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return to


def _base_weights(ck: checkpoint.Checkpoint, cfg: Config) -> tuple[dict[str, Tensor], Config]:
    """The float weights the adapter was trained over, with all the base's positions, and their Config."""
    path = hf.weights_path(ck.base_from)
    if path is None:  # a nanoft checkpoint
        base, positions = ck.base_from, checkpoint.read_meta(ck.base_from)["config"]["block_size"]
    elif path.with_name(hf.CONFIG).is_file():
        base, positions = str(path), hf.read_config(path.with_name(hf.CONFIG))["n_positions"]
    else:
        base, positions = str(path), cfg.block_size
    base_cfg = dataclasses.replace(cfg, finetune="none", block_size=positions, init_from=base)
    weights = load_pretrained(base_cfg, base).state_dict()
    if cfg.lora_kind == "qlora":  # what the adapter saw: each block linear through NF4 and back
        for name, w in weights.items():
            if name.startswith("blocks.") and w.dim() == 2:
                nf4 = NF4Tensor.from_float(w.float(), cfg.nf4_blocksize, cfg.double_quant)
                weights[name] = nf4.dequantize(torch.float32)
    return weights, base_cfg


def _write_lora(folder: Path, final: Path, ck: checkpoint.Checkpoint, cfg: Config) -> None:
    weights, base_cfg = _base_weights(ck, cfg)
    hf.write_gpt2(folder / "base", weights, base_cfg)
    tensors, config = to_peft(ck.model, cfg)
    config["base_model_name_or_path"] = str((final / "base").resolve())  # where it will be, once renamed
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def to_peft(adapter: dict[str, Tensor], cfg: Config) -> tuple[dict[str, Tensor], dict]:
    """nanoft's adapter tensors (by their checkpoint names) -> peft's adapter_model tensors and adapter_config."""
    r, alpha, C = cfg.lora_r, cfg.lora_alpha, cfg.n_embd
    qkv = [t for t in QKV if t in cfg.lora_targets]
    others = [t for t in cfg.lora_targets if t not in QKV]
    tensors = {}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"{PEFT}h.{i}."
        if qkv:
            A = torch.cat([adapter[f"{ours}{BLOCK_LINEARS[t]}.lora_A"] for t in qkv])  # (m r, C): the A's stacked
            B = torch.zeros(3 * C, len(qkv) * r)  # (3C, m r): projection t's B in its rows and its own r columns
            for n, t in enumerate(qkv):
                j = QKV.index(t)
                B[j * C:(j + 1) * C, n * r:(n + 1) * r] = adapter[f"{ours}{BLOCK_LINEARS[t]}.lora_B"]
            tensors[theirs + "attn.c_attn.lora_A.weight"], tensors[theirs + "attn.c_attn.lora_B.weight"] = A, B
        for t in others:  # one module on each side: the tensors as they are
            for ab in "AB":
                tensors[f"{theirs}{GPT2_MODULE[t]}.lora_{ab}.weight"] = adapter[f"{ours}{BLOCK_LINEARS[t]}.lora_{ab}"]
    for name, t in adapter.items():  # LayerNorms trained with lora_train_norms: peft's modules_to_save
        if name.endswith((".weight", ".bias")):
            tensors[PEFT + name.replace("blocks.", "h.")] = t
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "lora_dropout": cfg.lora_dropout, "fan_in_fan_out": True, "bias": "none", "use_rslora": False,
              "use_dora": False, "target_modules": (["c_attn"] if qkv else []) + [GPT2_MODULE[t] for t in others],
              "rank_pattern": {"c_attn": len(qkv) * r} if qkv else {},  # c_attn: rank m r, alpha m alpha: scale kept
              "alpha_pattern": {"c_attn": len(qkv) * alpha} if qkv else {},
              "modules_to_save": list(NORMS) if cfg.lora_train_norms else None, "inference_mode": True}
    return {k: v.detach().float().contiguous() for k, v in tensors.items()}, config


# --- in: a peft LoRA adapter for GPT-2 to a nanoft adapter checkpoint ---------------------------------------

def import_peft(adapter_dir: str, to: str, base: str | None = None, overwrite: bool = False) -> Path:
    """Read a peft LoRA adapter for a GPT-2 and write it as a nanoft LoRA checkpoint over `base` (default: the
    adapter's base_model_name_or_path), which sample.py and `python -m nanoft merge` then use."""
    folder = Path(adapter_dir)
    try:
        peft_cfg = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise ValueError(f"{adapter_dir} is not a peft adapter: {e}") from None
    base = base or peft_cfg.get("base_model_name_or_path") or ""
    if not hf.is_hf_source(base):
        raise ValueError(f"the adapter's base {base!r} is not a GPT-2 in Hugging Face layout; name one with --base")
    check_output_dir(to, [adapter_dir], overwrite)
    cfg = hf.resolve(Config(init_from=base, out_dir=str(to), dropout=0.0, block_size=1 << 20), announce=False)
    weights, lora_keys = from_peft(tensors, peft_cfg, cfg)  # block_size above: all the base's positions
    cfg = dataclasses.replace(cfg, finetune="lora", **lora_keys)
    extra = {"imported_from": str(folder), "adapter": adapter_config(cfg, cfg.init_from)}
    return checkpoint.save(to, checkpoint.Checkpoint(step=0, config=cfg.to_dict(), model=weights,
                                                     base_from=cfg.init_from, extra=extra))


def from_peft(tensors: dict[str, Tensor], peft_cfg: dict, cfg: Config) -> tuple[dict[str, Tensor], dict]:
    """peft's LoRA tensors for GPT-2 -> (nanoft's adapter tensors, the lora_* Config keys); one line where they
    do not map onto nanoft's LoRA (another method, DoRA, trained biases, some layers only, another module)."""
    for key, ok in (("peft_type", peft_cfg.get("peft_type") == "LORA"), ("use_dora", not peft_cfg.get("use_dora")),
                    ("bias", peft_cfg.get("bias", "none") == "none"), ("lora_bias", not peft_cfg.get("lora_bias"))):
        if not ok:
            raise ValueError(f"adapter_config.json: {key}={peft_cfg.get(key)!r} has no nanoft equivalent (plain LoRA)")
    pairs: dict[tuple[str, int], dict[str, Tensor]] = {}  # ("attn.c_attn", layer) -> {"A": (R, in), "B": (out, R)}
    norms = {}
    for key, t in tensors.items():
        if m := PEFT_LORA.fullmatch(key):
            pairs.setdefault((m[2], int(m[1])), {})[m[3]] = t.float()
        elif m := PEFT_NORM.fullmatch(key):
            norms[f"blocks.{m[1]}.{m[2]}.{m[3]}" if m[1] else f"{m[2]}.{m[3]}"] = t.float()
        else:
            raise ValueError(f"adapter tensor {key} has no place in nanoft's LoRA (GPT-2's c_attn, c_proj, c_fc only)")
    modules = sorted({module for module, _ in pairs})
    for module in modules:
        have = sum(set(pairs.get((module, i), {})) == {"A", "B"} for i in range(cfg.n_layer))
        if have != cfg.n_layer:
            raise ValueError(f"the adapter has {module} in {have} of {cfg.n_layer} layers; nanoft adapts every layer")
    scales = {_scale(peft_cfg, module, p["A"].shape[0]) for (module, _), p in pairs.items()}
    if len(scales) > 1:
        raise ValueError(f"the adapter's scales alpha/r differ between modules ({sorted(scales)}); "
                         "nanoft has one lora_alpha / lora_r")
    own = _split_qkv(pairs, cfg) if "attn.c_attn" in modules else {}
    for t in LORA_TARGETS:
        if t not in QKV and GPT2_MODULE[t] in modules:
            for i in range(cfg.n_layer):
                own[t, i] = pairs[GPT2_MODULE[t], i]["A"], pairs[GPT2_MODULE[t], i]["B"]
    rank = max(A.shape[0] for A, _ in own.values())
    weights = {}
    for (t, i), (A, B) in own.items():  # a smaller rank gets zero rows in A, zero columns in B: B A is the same
        weights[f"blocks.{i}.{BLOCK_LINEARS[t]}.lora_A"] = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])])
        weights[f"blocks.{i}.{BLOCK_LINEARS[t]}.lora_B"] = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], 1)
    all_norms = {f"blocks.{i}.{ln}.{p}" for i in range(cfg.n_layer) for ln in NORMS[:2] for p in ("weight", "bias")}
    if norms and set(norms) != all_norms | {"ln_f.weight", "ln_f.bias"}:
        raise ValueError("the adapter trains some LayerNorms; nanoft's lora_train_norms trains all (ln_1, ln_2, ln_f)")
    targets = tuple(t for t in LORA_TARGETS if (t, 0) in own)
    dropout = float(peft_cfg.get("lora_dropout", 0.0))
    return {**weights, **norms}, {"lora_r": rank, "lora_alpha": scales.pop() * rank, "lora_targets": targets,
                                  "lora_dropout": dropout, "lora_train_norms": bool(norms)}


def _scale(peft_cfg: dict, module: str, rank: int) -> float:
    """peft's scaling of one module: its alpha (alpha_pattern, else lora_alpha) / rank (rsLoRA: / sqrt(rank))."""
    alpha = peft_cfg.get("lora_alpha", 8)
    for pattern, value in (peft_cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", f"transformer.h.0.{module}"):  # peft's rule (utils.get_pattern_key)
            alpha = value
            break
    return alpha / (math.sqrt(rank) if peft_cfg.get("use_rslora") else rank)


def _split_qkv(pairs: dict, cfg: Config) -> dict[tuple[str, int], tuple[Tensor, Tensor]]:
    """c_attn's (A, B) of each layer -> each projection's (A, B). B's rows split by projection. Where every column
    of B serves one projection only (an export's block structure), each keeps its own columns of B and rows of
    A; otherwise each keeps all of A (still exact: B_t A)."""
    C, n = cfg.n_embd, cfg.n_layer
    used = [set() for _ in QKV]  # the columns each projection's rows of B use, in any layer
    for i in range(n):
        for j, rows in enumerate(pairs["attn.c_attn", i]["B"].split(C)):
            used[j] |= set(rows.ne(0).any(dim=0).nonzero().flatten().tolist())
    present = [j for j in range(3) if used[j]]
    disjoint = sum(len(u) for u in used) == len(set().union(*used))
    if not (present and disjoint and len({len(used[j]) for j in present}) == 1):
        present, used = [0, 1, 2], [range(pairs["attn.c_attn", 0]["A"].shape[0])] * 3  # dense: all of A for each
    own = {}
    for i in range(n):
        A, B = pairs["attn.c_attn", i]["A"], pairs["attn.c_attn", i]["B"]
        for j in present:
            cols = sorted(used[j])
            own[QKV[j], i] = (A[cols], B[j * C:(j + 1) * C, cols])
    return own


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanoft export", description=__doc__.split("\n")[0])
    p.add_argument("src", help="a nanoft out_dir (exported), or a peft adapter folder (imported)")
    p.add_argument("--to", required=True, help="the folder to write, or a .gguf file for llama.cpp")
    p.add_argument("--type", default=None, help="a .gguf file's weights: f16 (default), q8_0 or q4_0")
    p.add_argument("--base", default=None, help="import: the adapter's GPT-2 (a Hub name, folder or file), "
                                                "if not the one it names")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --to")
    args = p.parse_args(argv)
    try:
        if args.to.endswith(".gguf"):
            path = export_gguf(args.src, args.to, args.type or "f16", args.overwrite)
            print(f"exported {args.src} to {path} ({args.type or 'f16'}, {path.stat().st_size / 2**20:.1f} MiB)")
        elif args.type is not None:
            raise ValueError(f"--type {args.type} is for a GGUF export: give --to a name ending in .gguf")
        elif (Path(args.src) / "adapter_config.json").is_file():
            print(f"imported the peft adapter {args.src}: {import_peft(args.src, args.to, args.base, args.overwrite)}")
        else:
            print(f"exported {args.src} to {export(args.src, args.to, args.overwrite)}")
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
