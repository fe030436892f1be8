"""nanoft -> GGUF (llama.cpp's gpt2), against the real readers: transformers' GGUF loading and the gguf package.

A small random nanoft GPT (GPT-2's padded vocabulary, weights 5x GPT-2's init so that differences show) goes out
through the export command as f16, q8_0 and q4_0. transformers loads each file, dequantizes it with gguf.quants and
builds its own GPT2LMHeadModel, whose logits must be (1) nanoft's own on the weights read back from the file, to
float32 rounding, and (2) within the format's error of nanoft's float model, derived per logit from the weights' rounding: to
first order a logit moves by sum_j g_j e_j (g its gradient with respect to weight j, e_j the error the file's
storage made there), so |change| <= sum_j |g_j| |e_j|; and the linearised sum_j g_j e_j is the observed change to
within 10% (measured: f16 0.1%, q8_0 0.5%, q4_0 3%), so nothing but that rounding moved the logits. Each
comparison prints (pytest -s).
"""
import dataclasses
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoft.config import Config
from nanoft.data.tokenizer import get_tokenizer
from nanoft.interop.gguf import GPT2_VOCAB, TYPES, from_reader, load_gguf, storage, weight_bytes
from nanoft.model import GPT
from nanoft.peft.lora_model import adapter_config, adapter_state_dict, apply_lora, lora_modules
from nanoft.run import checkpoint
from nanoft.tools.export import main as export_main
from nanoft.tools.merge import merged_model

REL_TOL = 1e-5  # of the largest logit: float32 sums in another order (tests/interop/test_hf.py measured <= 1e-6)
TEXT = "ROMEO: What's this?\n\n  Über 123 naïve façade,\tdon't  stop — 東京 🙂 <|end"


def random_cfg(tied: bool, **keys) -> Config:
    return Config(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0, tie_embeddings=tied, **keys)


def random_run(out: Path, tied: bool, seed: int = 0) -> GPT:
    cfg = random_cfg(tied, out_dir=str(out))
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(5) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)  # norms, biases away from (1, 0)
    checkpoint.save(out, checkpoint.Checkpoint(step=1, config=cfg.to_dict(), model=model.state_dict()))
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {layout: (root / layout, random_run(root / layout, tied=layout == "tied")) for layout in ("tied", "untied")}


EXPORTS = [("f16", "tied"), ("q8_0", "tied"), ("q4_0", "untied")]  # (type, layout)


@pytest.fixture(scope="module")
def files(runs):
    """Each export written by the command and parsed once (a parse is seconds: GPT-2's 100,000 tokenizer strings):
    (type, layout) -> (path, gguf.GGUFReader, the weights nanoft reads from it)."""
    out = {}
    for type, layout in EXPORTS:
        path = export(runs[layout][0], type)
        reader = gguf.GGUFReader(path)
        out[type, layout] = path, reader, from_reader(reader, path)[0]
    return out


def export(src: Path, type: str) -> Path:
    to = src.with_name(f"{src.name}-{type}.gguf")
    export_main([str(src), "--to", str(to), "--type", type])
    return to


def ids(T: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, GPT2_VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def first_order(model: GPT, stored: dict, x: torch.Tensor, where: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each logit (b, t, v) in `where`, with g its gradient and e = stored - float the weights' rounding error:
    sum_j g_j e_j (the change linearised) and sum_j |g_j| |e_j| (a bound on it)."""
    params = dict(model.named_parameters())  # a tied head is wte itself: one tensor, both uses in its gradient
    errors = {}
    for name, p in params.items():
        e = torch.zeros_like(p)
        e[: len(stored[name])] = stored[name] - p.detach()[: len(stored[name])]  # padded vocab rows: not in the file
        errors[name] = e
    linear, bound = [], []
    for b, t, v in where:
        model.zero_grad()
        model(x)[b, t, v].backward()
        linear.append(sum((params[n].grad * errors[n]).sum() for n in params))
        bound.append(sum((params[n].grad.abs() * errors[n].abs()).sum() for n in params))
    return torch.stack(linear), torch.stack(bound)


def nanoft_on(weights: dict) -> GPT:
    """nanoft's GPT on weights read from a file (what load_gguf builds, without parsing the file again)."""
    model = GPT(Config(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=GPT2_VOCAB, dropout=0.0,
                       tie_embeddings=torch.equal(weights["lm_head.weight"], weights["wte.weight"])))
    model.load_state_dict(weights)
    return model.eval()


@pytest.mark.parametrize("type, layout", EXPORTS)
def test_transformers_reads_the_gguf_as_nanoft_computes_it_within_the_formats_error(runs, files, type, layout):
    model = runs[layout][1]
    path, _, stored = files[type, layout]
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    assert theirs.config.tie_word_embeddings == (layout == "tied")
    x = ids()
    with torch.no_grad():
        hf_logits = theirs(x).logits  # (B, T, 50257)
        ours_float = model(x)[..., :GPT2_VOCAB]
        ours_stored = nanoft_on(stored)(x)
    scale = hf_logits.abs().max()
    exact = (hf_logits - ours_stored).abs().max()
    diff = hf_logits - ours_float
    print(f"\n{type} ({layout}): transformers vs nanoft on the file's weights {exact:.2e}; vs nanoft float: "
          f"max {diff.abs().max():.2e}, mean {diff.abs().mean():.2e} (largest logit {scale:.2f})")
    assert exact <= REL_TOL * scale
    worst = diff.abs().flatten().topk(4).indices
    worst = [tuple(i.tolist()) for i in torch.stack(torch.unravel_index(worst, diff.shape), 1)]
    linear, bound = first_order(model, stored, x, worst)
    observed = torch.stack([diff[w] for w in worst])
    print(f"   the 4 largest differences {observed.tolist()}\n   linearised {linear.tolist()}\n"
          f"   bounds {bound.tolist()}")
    assert (observed.abs() <= bound + REL_TOL * scale).all()
    # and the linearised change is the change, to second order: the difference is the file's rounding, no more
    assert ((observed - linear).abs() <= 0.1 * observed.abs() + REL_TOL * scale).all()
    if type == "f16":  # f16 is fp16 rounding and nothing else
        assert torch.equal(stored["blocks.0.mlp.fc_in.weight"], model.blocks[0].mlp.fc_in.weight.half().float())


def test_the_tokens_merges_and_types_make_transformers_tokenize_as_tiktoken(files):
    path, reader, _ = files["f16", "tied"]
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    enc = get_tokenizer()
    for text in (TEXT, " leading space", "\n\nnewlines\r\n", "x" * 40, "The quick brown fox's 2,024 jumps."):
        assert tok.encode(text) == enc.encode_ordinary(text), text
    assert tok.eos_token_id == 50256 and tok.convert_ids_to_tokens(50256) == "<|endoftext|>"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert reader.get_field("tokenizer.ggml.token_type").contents()[-2:] == [gguf.TokenType.NORMAL,
                                                                            gguf.TokenType.CONTROL]


def test_what_is_stored_how_follows_llama_cpp(files):
    types = {t.name: t.tensor_type.name for t in files["q8_0", "tied"][1].tensors}
    assert "output.weight" not in types  # tied: llama.cpp and transformers take token_embd as the head
    assert types["token_embd.weight"] == types["blk.1.attn_qkv.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["position_embd.weight"] == types["blk.0.attn_qkv.bias"] == types["output_norm.weight"] == "F32"
    reader = files["q4_0", "untied"][1]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == types["blk.0.ffn_up.weight"] == "Q4_0"
    assert files["q8_0", "tied"][2]["wte.weight"].shape == (GPT2_VOCAB, 64)  # 50,304 padded rows: 50,257 out
    embedding = torch.zeros(GPT2_VOCAB, 64)  # tied, token_embd is the head too: q4_0 keeps it in q8_0
    assert [storage("token_embd.weight", embedding, TYPES["q4_0"], tied) for tied in (True, False)] == ["q8_0", "q4_0"]
    assert reader.get_field("gpt2.context_length").contents() == 32
    for (type, layout), (path, reader, _) in files.items():  # the estimate is the tensors' bytes in the file
        assert weight_bytes(random_cfg(layout == "tied"), type) == sum(int(t.n_bytes) for t in reader.tensors)
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_0


def test_a_lora_run_exports_merged_into_its_base(runs, tmp_path):
    base, _ = runs["tied"]
    cfg = dataclasses.replace(Config.from_dict(checkpoint.load(base).config), finetune="lora", init_from=str(base),
                              lora_r=4, lora_alpha=8.0, out_dir=str(tmp_path / "lora"), dtype="float32")
    model = apply_lora(GPT(Config.from_dict(checkpoint.load(base).config)), cfg)
    model.load_state_dict(checkpoint.load(base).model, strict=False)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=torch.Generator().manual_seed(3)))
    ck = checkpoint.Checkpoint(step=1, config=cfg.to_dict(), model=adapter_state_dict(model), base_from=str(base),
                               extra={"adapter": adapter_config(cfg, str(base))})
    checkpoint.save(tmp_path / "lora", ck)
    stored = load_gguf(export(tmp_path / "lora", "f16")).state_dict()
    merged = merged_model(checkpoint.load(tmp_path / "lora"), cfg, str(base)).state_dict()
    assert not torch.equal(merged["blocks.0.attn.q_proj.weight"], checkpoint.load(base).model["blocks.0.attn.q_proj.weight"])
    for name in ("blocks.0.attn.q_proj.weight", "blocks.1.attn.v_proj.weight"):  # the update is in, fp16-rounded
        assert torch.equal(stored[name], merged[name].half().float())


@pytest.mark.parametrize("args, message", [
    (["--type", "q5_k"], r"unknown --type 'q5_k'; a GGUF export is one of f16, q8_0, q4_0"),
    (["--to", "out.gguf.d/"], r"--type"),  # filled in below: a folder export with --type
])
def test_bad_input_is_one_line_and_leaves_nothing_behind(runs, tmp_path, args, message):
    src, _ = runs["tied"]
    if args[0] == "--to":
        args, message = ["--to", str(tmp_path / "folder"), "--type", "q8_0"], r"--type q8_0 is for a GGUF export"
    else:
        args = ["--to", str(tmp_path / "m.gguf"), *args]
    with pytest.raises(SystemExit, match=rf"^error: {message}") as e:
        export_main([str(src), *args])
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_an_existing_file_is_kept_without_overwrite_and_a_crash_leaves_no_file(runs, tmp_path, monkeypatch):
    src, _ = runs["tied"]
    to = tmp_path / "m.gguf"
    to.write_bytes(b"someone's file")
    with pytest.raises(SystemExit, match=r"^error: --to .*m.gguf already exists; pick another file, or --overwrite"):
        export_main([str(src), "--to", str(to)])
    assert to.read_bytes() == b"someone's file"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)  # the failure a full disk gives, mid-write
    with pytest.raises(OSError, match="disk full"):
        export_main([str(src), "--to", str(to), "--overwrite"])
    assert to.read_bytes() == b"someone's file" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
