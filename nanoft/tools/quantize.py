"""Post-training quantization of a trained model: `python -m nanoft quantize RUN --to DIR`.

    python -m nanoft quantize out/tiny --method rtn --bits 8 --to out/tiny-rtn8
    python -m nanoft quantize out/tiny --method rtn --bits 4 --group_size 128 --to out/tiny-rtn4
    python -m nanoft quantize out/tiny --method gptq --bits 4 --group_size 128 --to out/tiny-gptq4 [--act_order]
    python -m nanoft quantize out/tiny --method awq --bits 4 --group_size 128 --to out/tiny-awq4
    python -m nanoft quantize out/tiny --method nf4 --to out/tiny-nf4      # QLoRA's NF4 as a weight-only format

Every Linear in the blocks (q, k, v, out_proj, fc_in, fc_out) becomes a frozen integer layer (nanoft.quant: int8
per-channel symmetric, int4 group-wise asymmetric, or nf4); the embeddings, LayerNorms and the head stay float.
The methods choose the codes:

    rtn    round to nearest on the grid (nanoft/quant/int_linear.py); no data
    gptq   Frantar et al. 2022 (nanoft/quant/gptq.py): block by block, layer group by layer group (q/k/v, then
           out_proj, then fc_in, then fc_out), H = 2 X X^T from each group's inputs computed by the blocks and
           layers already quantized, then the column-by-column rounding with error feedback
    awq    Lin et al. 2023 (nanoft/quant/awq.py): per block, input-channel scales searched on the float block's
           activations and folded into ln_1 -> q/k/v, v -> out_proj and ln_2 -> fc_in (fc_out reads a GELU, which
           no per-channel scale passes through unchanged: it gets the clipping search only), then clipping, then
           rounding. As llm-awq does, each block's inputs are the float model's
    nf4    nanoft's NF4 (bitsandbytes' layout, blocks of --group_size, default 64, double quantized); no data

Calibration (gptq, awq): --calib_tokens tokens (default 16,384) as windows of block_size drawn from the run's
training split (its dataset's train.bin), with a seed apart from training's and validation's. The result is a
nanoft checkpoint (ckpt.json + safetensors, written atomically) whose ckpt.json records the format, its
parameters and the quantized layers (extra.quant): sample.py and `python -m nanoft evaluate` run it as it is;
`train.py --init_from=DIR` starts from its dequantized numbers.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from nanoft.config import Config
from nanoft.data.corpus import ensure_dataset
from nanoft.data.tokens import Batches, check_token_files
from nanoft.quant import Int4Linear, Int8Linear, Linear4bit
from nanoft.quant.awq import apply_clip, scale_fc_fc, scale_ln_fcs, search_clip, search_scale
from nanoft.quant.gptq import gptq, hessian
from nanoft.quant.int_linear import rtn
from nanoft.run import checkpoint
from nanoft.run.base_model import load_base_model

METHODS = ("rtn", "gptq", "awq", "nf4")
# the Linears of a block, in the order their inputs are computed: each group reads one input
LAYER_GROUPS = (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.out_proj",), ("mlp.fc_in",), ("mlp.fc_out",))
CHUNK = 8  # calibration sequences per block forward


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanoft quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a nanoft checkpoint dir holding a full model (out/tiny, out/tiny/best)")
    p.add_argument("--to", required=True, help="the directory to write the quantized checkpoint to")
    p.add_argument("--method", default="rtn", choices=METHODS)
    p.add_argument("--bits", type=int, default=4, choices=(8, 4), help="8: per-channel symmetric; 4: group-wise")
    p.add_argument("--group_size", type=int, default=0,
                   help="input columns per scale and zero (4 bits; default 128; nf4: its block size, default 64)")
    p.add_argument("--calib_tokens", type=int, default=16384, help="calibration tokens (gptq, awq)")
    p.add_argument("--act_order", action="store_true", help="gptq: columns by decreasing activation (static groups)")
    p.add_argument("--no_clip", action="store_true", help="awq: scales only, no clipping search")
    p.add_argument("--percdamp", type=float, default=0.01, help="gptq: dampening, a fraction of H's mean diagonal")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --to")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """One line for a combination that cannot work, before anything is read or written."""
    if args.method == "awq" and args.bits != 4:
        raise ValueError("--method awq quantizes to 4 bits (--bits 4); for 8 bits use rtn or gptq")
    if args.method == "nf4" and args.bits != 4:
        raise ValueError("--method nf4 is a 4-bit format (--bits 4)")
    if args.bits == 8 and args.group_size:
        raise ValueError("--bits 8 has one scale per output channel: leave out --group_size")
    if args.group_size < 0 or args.calib_tokens < 1 or not 0 <= args.percdamp < 1:
        raise ValueError("--group_size must be >= 1, --calib_tokens >= 1 and --percdamp in [0, 1)")
    if Path(args.to).resolve() == Path(args.run).resolve():
        raise ValueError(f"--to {args.to} is the run itself: write the quantized model to another directory")
    if checkpoint.exists(args.to) and not args.overwrite:
        raise ValueError(f"{args.to} already holds a checkpoint: pass --overwrite to replace it")


def layer_format(args: argparse.Namespace, in_features: int) -> tuple[str, dict]:
    """(format name in nanoft.quant.FORMATS, its constructor parameters) for a layer of in_features."""
    if args.method == "nf4":
        return "nf4", {"blocksize": args.group_size or 64, "double_quant": True}
    if args.bits == 8:
        return "int8", {}
    group = args.group_size or 128
    if in_features % group:
        raise ValueError(f"--group_size {group} does not divide the layer width {in_features} (n_embd and 4 * n_embd)")
    return "int4", {"group_size": group}


def quantized_layer(args: argparse.Namespace, linear: nn.Linear, H: Tensor | None) -> nn.Module:
    """linear as a frozen quantized layer: RTN (or NF4) of its weight, or GPTQ's codes given its inputs' H."""
    fmt, params = layer_format(args, linear.in_features)
    if fmt == "nf4":
        return Linear4bit.from_linear(linear, **params)
    group = params.get("group_size", linear.in_features)
    w = linear.weight.detach()
    if H is None:
        codes, scale, zero = rtn(w, args.bits, group, sym=args.bits == 8)
    else:
        codes, scale, zero = gptq(w, H, args.bits, group, sym=args.bits == 8, act_order=args.act_order,
                                  percdamp=args.percdamp)
    if fmt == "int8":
        return Int8Linear.from_codes(codes, scale, linear.bias)
    return Int4Linear.from_codes(codes, scale, zero, linear.bias)


def set_layer(block: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(block.get_submodule(parent), attr, layer)


@torch.no_grad()
def block_inputs(block: nn.Module, x: Tensor, names: tuple[str, ...]) -> tuple[dict[str, Tensor], Tensor]:
    """({name: the input each named Linear sees (N, T, in)}, the block's output (N, T, C)) on inputs x (N, T, C)."""
    seen: dict[str, list[Tensor]] = {name: [] for name in names}
    hooks = [block.get_submodule(name).register_forward_hook(lambda m, inp, out, name=name: seen[name].append(inp[0]))
             for name in names]
    try:
        out = torch.cat([block(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}, out


@torch.no_grad()
def run_chunked(fn, x: Tensor) -> Tensor:
    return torch.cat([fn(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])


@torch.no_grad()
def quantize_block_gptq(args, block: nn.Module, x: Tensor) -> Tensor:
    """GPTQ one block, group by group, each group's H from inputs through the layers already quantized; returns
    the quantized block's output, the next block's calibration inputs."""
    for group in LAYER_GROUPS:
        inputs, _ = block_inputs(block, x, group[:1])  # the layers of a group read the same input
        H = hessian([inputs[group[0]]])
        for name in group:
            set_layer(block, name, quantized_layer(args, block.get_submodule(name), H))
    return run_chunked(block, x)


@torch.no_grad()
def quantize_block_awq(args, block: nn.Module, x: Tensor) -> Tensor:
    """AWQ one block: scales searched and folded, clipping searched and applied, then rounding. Returns the float
    block's output (the next block's inputs, as llm-awq takes them)."""
    names = tuple(name for group in LAYER_GROUPS for name in group)
    feats, out = block_inputs(block, x, names)
    attn, mlp = block.attn, block.mlp
    g = layer_format(args, attn.q_proj.in_features)[1]["group_size"]

    report = []  # per search: the best alpha, its output error against plain rounding's, the loudest channel

    def search(x: Tensor, linears: list[nn.Linear], run, label: str) -> Tensor:
        s, errors = search_scale(x, linears, run, args.bits, g)
        loud = x.abs().reshape(-1, x.shape[-1]).mean(0)
        report.append(f"{label} alpha {errors.index(min(errors)) / len(errors):.2f} "
                      f"(error {min(errors) / errors[0]:.2f}x rtn's; loudest channel {loud.max() / loud.median():.1f}x "
                      f"the median)")
        return s

    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    a = feats["attn.q_proj"]
    s = search(a, qkv, lambda: run_chunked(attn, a), "q/k/v")
    scale_ln_fcs(block.ln_1, qkv, s)
    feats["attn.q_proj"] = feats["attn.k_proj"] = feats["attn.v_proj"] = a / s  # what the scaled layers now read

    o = feats["attn.out_proj"]
    s = search(o, [attn.out_proj], lambda: run_chunked(attn.out_proj, o), "out_proj")
    scale_fc_fc(attn.v_proj, attn.out_proj, s)
    feats["attn.out_proj"] = o / s

    m = feats["mlp.fc_in"]
    s = search(m, [mlp.fc_in], lambda: run_chunked(mlp, m), "fc_in")
    scale_ln_fcs(block.ln_2, [mlp.fc_in], s)
    feats["mlp.fc_in"] = m / s
    print("  awq " + "; ".join(report), file=sys.stderr)

    for name in names:
        linear = block.get_submodule(name)
        if not args.no_clip and name not in ("attn.q_proj", "attn.k_proj"):  # q, k: not clipped (nanoft/quant/awq.py)
            apply_clip(linear, search_clip(linear.weight, feats[name], args.bits, g))
        set_layer(block, name, quantized_layer(args, linear, None))
    return out


def calibration_ids(cfg: Config, tokens: int, device: str) -> Tensor:
    """(N, block_size) token windows from the run's training split: N = ceil(tokens / block_size)."""
    data_dir = check_token_files(ensure_dataset(cfg.dataset), cfg.vocab_size)
    n = math.ceil(tokens / cfg.block_size)
    batches = Batches(data_dir / "train.bin", n, cfg.block_size, cfg.seed + 2, device)  # seed apart from train/val
    return batches.next()[0]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    check_args(args)
    ckpt_meta = checkpoint.read_meta(args.run)
    cfg = Config.from_dict(ckpt_meta["config"])
    layer_format(args, cfg.n_embd)  # a group size that does not fit the model: one line now, not after the work
    model = load_base_model(cfg, args.run).to(args.device).float().eval()  # refuses adapters in one line
    names = [f"blocks.{i}.{name}" for i in range(cfg.n_layer) for group in LAYER_GROUPS for name in group]
    if args.method in ("gptq", "awq"):
        ids = calibration_ids(cfg, args.calib_tokens, args.device)
        with torch.no_grad():
            x = model.drop(model.wte(ids) + model.wpe(torch.arange(ids.shape[1], device=args.device)))  # (N, T, C)
        step = quantize_block_gptq if args.method == "gptq" else quantize_block_awq
        for i, block in enumerate(model.blocks):
            x = step(args, block, x)
            print(f"block {i}: {args.method} done", file=sys.stderr)
    else:
        for block in model.blocks:
            for name in (n for group in LAYER_GROUPS for n in group):
                set_layer(block, name, quantized_layer(args, block.get_submodule(name), None))
    fmt, params = layer_format(args, cfg.n_embd)
    quant = {"method": args.method, "format": fmt, "bits": args.bits, "params": params, "layers": names,
             "act_order": args.act_order, "calib_tokens": args.calib_tokens if args.method in ("gptq", "awq") else 0}
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    checkpoint.save(args.to, checkpoint.Checkpoint(step=ckpt_meta["step"], config=ckpt_meta["config"], model=weights,
                                                   base_from=str(Path(args.run).resolve()), extra={"quant": quant}))
    n_bytes = sum(f.stat().st_size for f in Path(args.to).glob("ckpt-*.safetensors"))
    print(f"{args.method} {fmt} ({', '.join(f'{k}={v}' for k, v in params.items()) or 'per channel'}): "
          f"{len(names)} layers -> {args.to} ({n_bytes / 2**20:.2f} MiB on disk)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        sys.exit(f"error: {e}")
