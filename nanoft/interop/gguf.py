"""GGUF, llama.cpp's one-file model format: a nanoft GPT written as llama.cpp's `gpt2` architecture, and read back.

    write_gguf("model.gguf", model.state_dict(), cfg, "q8_0")   # then: llama-cli -m model.gguf -p "ROMEO:"
    model = load_gguf("model.gguf")                              # a nanoft GPT, dequantized to float32

A GGUF file is a header of typed key/values (the hyperparameters, the tokenizer) and named tensors, each with its
own storage type. llama.cpp's GPT-2 (its convert_hf_to_gguf.py GPT2Model, its llama-model.cpp loader) names them:

    nanoft                                   GGUF                                   stored (f16 / q8_0 / q4_0)
    wte.weight  (V, C)                       token_embd.weight                      f16 / q8_0 / q4_0 (head: q8_0)
    wpe.weight  (T, C)                       position_embd.weight                   f32
    blocks.i.ln_1 weight, bias               blk.i.attn_norm.weight, .bias          f32
    blocks.i.attn.{q,k,v}_proj  3 x (C, C)   blk.i.attn_qkv.weight  (3C, C)         f16 / q8_0 / q4_0
                                             blk.i.attn_qkv.bias  (3C,)             f32
    blocks.i.attn.out_proj                   blk.i.attn_output.weight, .bias        matrix / f32
    blocks.i.ln_2                            blk.i.ffn_norm.weight, .bias           f32
    blocks.i.mlp.fc_in  (4C, C)              blk.i.ffn_up.weight, .bias             matrix / f32
    blocks.i.mlp.fc_out (C, 4C)              blk.i.ffn_down.weight, .bias           matrix / f32
    ln_f                                     output_norm.weight, .bias              f32
    lm_head (only when untied)               output.weight  (V, C)                  f16 / q8_0 / q8_0

Shapes above are numpy's (rows, columns); ggml lists them the other way round ({C, 3C} for attn_qkv). No layout
change is needed: ggml multiplies x by a weight stored (out, in), which is nn.Linear's own layout; only GPT-2's
Conv1D, stored (in, out), is transposed by llama.cpp's converter, and nanoft has none. What stays float32 follows
that converter: every 1-D tensor (norms, biases) and the position table. A tied model (tie_embeddings) writes no
output.weight, and llama.cpp and transformers then use token_embd as the head, which is what nanoft computes.
The vocabulary is GPT-2's 50,257 tokens: a model padded to 50,304 rows for faster matmuls exports the first 50,257
(the padding is never a target; its logits only add a little to the softmax's denominator: see the README).

q8_0 and q4_0 blocks are written by nanoft's own quantizer (nanoft/quant/ggml_blocks.py, bit-exact against the gguf
package's). q4_0 keeps the head (output.weight, or token_embd when it is also the head) in q8_0: llama.cpp's own
llama-quantize gives the head more bits than the blocks for the same reason (its q4_0 files hold it in q6_K, a
format nanoft does not write), since every logit goes through it. A matrix whose rows are not whole blocks of 32
is written f16, as llama.cpp's converter does.

The tokenizer is GPT-2's byte-level BPE, from tiktoken (nanoft.data.tokenizer): each token's bytes spelled with
GPT-2's byte-to-character table (a space is "Ġ"), the 50,000 merges in rank order as "left right", and
<|endoftext|> (50256) a control token that begins nothing (add_bos_token false, as GPT-2's tokenizer) and ends
generation (eos).

The `gguf` package (llama.cpp's own Python reader and writer; pip install nanoft[gguf]) is imported only here.
"""
from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nanoft.config import Config
from nanoft.data.tokenizer import EOT_ID, get_tokenizer
from nanoft.model import GPT
from nanoft.quant.ggml_blocks import BLOCK, GGML_BLOCKS

GPT2_VOCAB = 50257  # GPT-2's tokens: 256 bytes, 50,000 merges, <|endoftext|>
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which nanoft's blocks use


@dataclass(frozen=True)
class GGUFType:
    """One --type: llama.cpp's file type number and how each weight matrix is stored."""
    file_type: int  # llama.cpp's LlamaFileType (general.file_type): what tools show as the file's type
    matrices: str  # the block linears and an untied token embedding: "f16", "q8_0" or "q4_0"
    head: str  # the output head, or the token embedding when it is the head too (tied)


TYPES = {
    "f16": GGUFType(file_type=1, matrices="f16", head="f16"),  # half precision: 16 bits a weight
    "q8_0": GGUFType(file_type=7, matrices="q8_0", head="q8_0"),  # 8.5 bits a weight
    "q4_0": GGUFType(file_type=2, matrices="q4_0", head="q8_0"),  # 4.5 bits, the head 8.5 (see the docstring)
}
BLOCK_TENSORS = [  # nanoft's name in a block -> GGUF's, for the tensors that map one to one
    ("ln_1", "attn_norm"), ("attn.out_proj", "attn_output"), ("ln_2", "ffn_norm"),
    ("mlp.fc_in", "ffn_up"), ("mlp.fc_out", "ffn_down")]
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")  # their rows, in this order, make attn_qkv


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF needs llama.cpp's gguf package: pip install 'nanoft[gguf]'") from None
    return gguf


# --- the layout ---------------------------------------------------------------------------------------

def to_gguf_tensors(weights: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """nanoft's float weights (GPT(cfg).state_dict() names) -> GGUF's names and shapes, float32, vocabulary rows
    cut to GPT-2's 50,257. A model without biases (bias=False) gets zero biases: llama.cpp's GPT-2 requires them."""
    if cfg.vocab_size < GPT2_VOCAB:
        raise ValueError(f"the model has vocab_size={cfg.vocab_size}, fewer rows than GPT-2's {GPT2_VOCAB} tokens")

    def bias(name: str, n: int) -> Tensor:
        return weights[name] if name in weights else torch.zeros(n)

    C = cfg.n_embd
    out = {"token_embd.weight": weights["wte.weight"][:GPT2_VOCAB], "position_embd.weight": weights["wpe.weight"],
           "output_norm.weight": weights["ln_f.weight"], "output_norm.bias": bias("ln_f.bias", C)}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        out[theirs + "attn_qkv.weight"] = torch.cat([weights[ours + p + ".weight"] for p in QKV])  # (3C, C)
        out[theirs + "attn_qkv.bias"] = torch.cat([bias(ours + p + ".bias", C) for p in QKV])
        for a, b in BLOCK_TENSORS:
            w = weights[ours + a + ".weight"]
            out[theirs + b + ".weight"], out[theirs + b + ".bias"] = w, bias(ours + a + ".bias", w.shape[0])
    if not cfg.tie_embeddings:
        out["output.weight"] = weights["lm_head.weight"][:GPT2_VOCAB]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def storage(name: str, t: Tensor, kind: GGUFType, tied: bool) -> str:
    """How one tensor is stored: "f32", "f16", "q8_0" or "q4_0" (see the module docstring for why)."""
    if t.dim() == 1 or name == "position_embd.weight":
        return "f32"
    is_head = name == "output.weight" or (tied and name == "token_embd.weight")
    chosen = kind.head if is_head else kind.matrices
    return "f16" if chosen in GGML_BLOCKS and t.shape[-1] % BLOCK else chosen


def encode(t: Tensor, how: str) -> np.ndarray:
    """A float32 tensor as the array the file holds: float32, float16, or the blocks' bytes (rows, bytes a row)."""
    if how == "f32":
        return t.numpy()
    if how == "f16":
        return t.half().numpy()
    return GGML_BLOCKS[how].quantize(t).numpy()


def decode(data: np.ndarray, how: str) -> Tensor:
    """encode's inverse: the float32 values the file means."""
    t = torch.from_numpy(np.array(data))  # a copy: a reader's arrays are read-only views of the file
    return t.float() if how in ("f32", "f16") else GGML_BLOCKS[how].dequantize(t)


def weight_bytes(cfg: Config, type: str) -> int:
    """Bytes of a GGUF's tensors for a model of this Config (the file adds its header, GPT-2's tokenizer (1.8 MB:
    100,000 strings) and alignment padding): what `python -m nanoft memory` lists beside the other quantized formats."""
    with torch.device("meta"):  # shapes only
        tensors = to_gguf_tensors(GPT(cfg).state_dict(), cfg)
    size = {"f32": 4, "f16": 2, **{name: f.block_bytes / BLOCK for name, f in GGML_BLOCKS.items()}}
    return int(sum(t.numel() * size[storage(n, t, TYPES[type], cfg.tie_embeddings)] for n, t in tensors.items()))


# --- the tokenizer ----------------------------------------------------------------------------------------

@functools.cache
def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (its encoder.py bytes_to_unicode): the 188 printable Latin-1
    bytes stand for themselves; the rest (control bytes, space) take 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@functools.cache
def gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of GPT-2's BPE, as llama.cpp's "gpt2" tokenizer model reads them.

    A BPE token of rank r (r >= 256) was made by merging two tokens of lower rank; which two is what encoding its
    own bytes with only the merges below r leaves: start from single bytes and keep merging the adjacent pair of
    lowest rank below r until none is left; two parts remain. Merge r - 256 is "left right"."""
    enc = get_tokenizer()
    gguf = _gguf()
    spelled = [enc.decode_single_token_bytes(i) for i in range(EOT_ID)]
    rank = {b: i for i, b in enumerate(spelled)}
    chars = byte_chars()
    tokens = ["".join(chars[b] for b in token) for token in spelled]
    merges = []
    for r in range(256, EOT_ID):
        parts = [bytes([b]) for b in spelled[r]]
        while len(parts) > 2:
            pairs = [(rank.get(a + b, r), k) for k, (a, b) in enumerate(itertools.pairwise(parts))]
            best, k = min(pairs)
            if best >= r:
                break
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {r} of the GPT-2 tokenizer is not one merge of two lower-ranked tokens")
        merges.append(" ".join("".join(chars[b] for b in part) for part in parts))
    types = [int(gguf.TokenType.NORMAL)] * EOT_ID + [int(gguf.TokenType.CONTROL)]
    return [*tokens, enc.decode_single_token_bytes(EOT_ID).decode()], types, merges


# --- writing and reading --------------------------------------------------------------------------------

def write_gguf(path: str | Path, weights: dict[str, Tensor], cfg: Config, type: str, name: str = "nanoft") -> Path:
    """Write a nanoft model (float weights by GPT(cfg).state_dict() names) to `path` as a llama.cpp gpt2 GGUF of
    `type` (f16, q8_0, q4_0): whole, or not at all (written beside it, then renamed)."""
    gguf = _gguf()
    if type not in TYPES:
        raise ValueError(f"unknown GGUF --type {type!r}; choose one of {', '.join(TYPES)}")
    kind, path = TYPES[type], Path(path)
    tensors = to_gguf_tensors(weights, cfg)
    tokens, token_types, merges = gpt2_vocab()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "gpt2")
    try:
        writer.add_name(name)
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_file_type(kind.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        for set_id in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_unk_token_id):
            set_id(EOT_ID)
        writer.add_add_bos_token(False)
        for tensor_name, t in tensors.items():
            how = storage(tensor_name, t, kind, cfg.tie_embeddings)
            raw = gguf.GGMLQuantizationType[how.upper()] if how in GGML_BLOCKS else None
            writer.add_tensor(tensor_name, encode(t, how), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()  # a no-op once closed
        tmp.unlink(missing_ok=True)
    return path


def _field(reader, key: str, path: str | Path):
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"{path}: no {key} in the GGUF header")
    return field.contents()


def read_gguf(path: str | Path) -> tuple[dict[str, Tensor], Config]:
    """A llama.cpp gpt2 GGUF -> (nanoft float32 weights by GPT(cfg).state_dict() names, their Config). Any
    storage type the file uses that nanoft decodes: f32, f16, q8_0, q4_0."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read GGUF {path}: {e}") from None
    return from_reader(reader, path)


def from_reader(reader, path: str | Path) -> tuple[dict[str, Tensor], Config]:
    """read_gguf on a file a gguf.GGUFReader has already parsed (parsing GPT-2's 100,000 tokenizer strings is
    most of a read's time)."""
    arch = _field(reader, "general.architecture", path)
    if arch != "gpt2":
        raise ValueError(f"{path}: architecture {arch!r} is not gpt2; nanoft reads GPT-2-architecture files only")
    C = int(_field(reader, "gpt2.embedding_length", path))
    if int(_field(reader, "gpt2.feed_forward_length", path)) != 4 * C:
        raise ValueError(f"{path}: feed_forward_length is not 4 * embedding_length, which nanoft's MLP is")
    if abs(float(_field(reader, "gpt2.attention.layer_norm_epsilon", path)) - LAYER_NORM_EPS) > 1e-9:
        raise ValueError(f"{path}: layer_norm_epsilon is not nanoft's {LAYER_NORM_EPS}")
    names = {t.tensor_type.name.lower(): t.tensor_type for t in reader.tensors}
    unknown = set(names) - {"f32", "f16", *GGML_BLOCKS}
    if unknown:
        raise ValueError(f"{path} holds {', '.join(sorted(unknown))} tensors; nanoft decodes f32, f16, q8_0, q4_0")
    g = {t.name: decode(t.data, t.tensor_type.name.lower()).reshape(tuple(reversed([int(n) for n in t.shape])))
         for t in reader.tensors}
    cfg = Config(n_layer=int(_field(reader, "gpt2.block_count", path)), n_head=int(_field(reader, "gpt2.attention.head_count", path)),
                 n_embd=C, block_size=int(_field(reader, "gpt2.context_length", path)), vocab_size=len(g["token_embd.weight"]),
                 bias=True, dropout=0.0, tie_embeddings="output.weight" not in g)
    w = {"wte.weight": g.pop("token_embd.weight"), "wpe.weight": g.pop("position_embd.weight"),
         "ln_f.weight": g.pop("output_norm.weight"), "ln_f.bias": g.pop("output_norm.bias")}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        for p, wt, b in zip(QKV, g.pop(theirs + "attn_qkv.weight").split(C), g.pop(theirs + "attn_qkv.bias").split(C)):
            w[ours + p + ".weight"], w[ours + p + ".bias"] = wt, b
        for a, b in BLOCK_TENSORS:
            w[ours + a + ".weight"], w[ours + a + ".bias"] = g.pop(theirs + b + ".weight"), g.pop(theirs + b + ".bias")
    w["lm_head.weight"] = g.pop("output.weight", w["wte.weight"])
    if g:
        raise ValueError(f"{path} holds tensors nanoft's GPT has no place for: {sorted(g)[:3]}")
    return w, cfg


def load_gguf(path: str | Path) -> GPT:
    """A nanoft GPT with the GGUF's weights, dequantized to float32 (eval mode): nanoft's evaluation and sampling
    run on exactly what llama.cpp runs."""
    weights, cfg = read_gguf(path)
    model = GPT(cfg)
    model.load_state_dict(weights)
    return model.eval()
