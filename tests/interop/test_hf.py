"""nanoft and the Hugging Face world, against the real transformers and peft (test-only dependencies).

Small random GPT-2s made by transformers' save_pretrained are served by a loopback HTTP server that answers
as the Hub does (resolve URLs, a 302 to a content address carrying X-Linked-Etag, a 307 for a renamed
repository), and reach nanoft through its real download path: `--init_from=<name>`, train.py, sample.py.
Then the way out: nanoft -> transformers (tied and untied heads), a LoRA run -> peft (q/k/v folded into
c_attn), and a peft adapter -> nanoft. Each comparison prints its largest logit difference (pytest -s).
"""
import codecs
import dataclasses
import hashlib
import json
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from nanoft.config import Config
from nanoft.data import tokens
from nanoft.data.sft import write_sft_jsonl
from nanoft.interop import hf
from nanoft.interop.pretrained import load_pretrained
from nanoft.peft.lora_model import adapter_config, adapter_state_dict, apply_lora, load_adapter_state_dict, lora_modules
from nanoft.run import checkpoint
from nanoft.tools.export import export, import_peft
from nanoft.tools.export import main as export_main

ROOT = Path(__file__).resolve().parents[2]
# GPT-2's vocabulary (text round trips), and weights 5x GPT-2's init: activations large enough that GELU's tanh
# approximation and the exact erf GELU differ by 2.4e-4 of the largest logit (at GPT-2's 0.02, by 2.6e-6 absolute)
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, initializer_range=0.1)
REL_TOL = 1e-5  # of the largest logit: float32 rounding of sums in another order (measured 2.8e-7 to 9.2e-7)


class Hub:
    """Serves <root>/<owner>/<name>/<file> at /<owner>/<name>/resolve/main/<file> as huggingface.co does."""

    def __init__(self, root: Path):
        self.root, self.requests, self.etags = root, [], {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                hub.requests.append((self.command, self.path))
                parts = self.path.lstrip("/").split("/")
                if parts[0] == "cdn":  # the content address a weights file redirects to
                    return self.send(200, (hub.root / "/".join(parts[1:])).read_bytes(), body)
                if parts[0] == "renamed":  # a moved repository: a relative redirect on the Hub itself
                    return self.send(307, b"", body, Location="/" + "/".join(["tiny", *parts[1:]]))
                repo, file = "/".join(parts[:-3]), parts[-1]
                path = hub.root / repo / file
                if not path.is_file():
                    return self.send(404, b"", body)
                if file.endswith(".safetensors"):
                    sha = hub.etags.get(repo, hashlib.sha256(path.read_bytes()).hexdigest())
                    url = f"http://127.0.0.1:{hub.port}/cdn/{repo}/{file}"
                    return self.send(302, b"", body, Location=url, **{"X-Linked-Etag": f'"{sha}"'})
                self.send(200, path.read_bytes(), body)

            def send(self, status, payload, body, **headers):
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def publish(self, repo: str, tied: bool = True, seed: int = 0, **config) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**{**SHAPE, **config}, tie_word_embeddings=tied)).eval()
        with torch.no_grad():  # layer norms away from their (1, 0) init, so a mix-up shows
            for name, p in model.named_parameters():
                if ".ln_" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(self.root / repo)
        return model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The Hub on loopback, nanoft's data root (and so its cache) in a temporary folder."""
    root = tmp_path_factory.mktemp("hf")
    (root / "data" / ".cache").mkdir(parents=True)
    shutil.copy(tokens.cache_dir() / "gpt2.tiktoken", root / "data" / ".cache")  # the tokenizer, offline
    server = Hub(root / "hub")
    server.models = {"tied": server.publish("tiny/tied"), "untied": server.publish("tiny/untied", tied=False, seed=1)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokens, "DATA_ROOT", root / "data")
        mp.setenv("NANOFT_HF_ENDPOINT", f"http://127.0.0.1:{server.port}")
        yield server
    server.httpd.shutdown()


def online(monkeypatch):
    monkeypatch.setenv("NANOFT_OFFLINE", "0")  # conftest sets 1: here the only server is the loopback Hub


def ids(T: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))


def nanoft_logits(model, x):
    return model.lm_head(model.hidden_states(x))  # every position's logits


def peft_over_its_base(folder: Path) -> PeftModel:
    """What a user of an exported LoRA run loads: the base from folder/base, the adapter from folder."""
    return PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(folder / "base"), folder).eval()


def report(what: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    print(f"\n{what}: max |logit difference| = {diff:.2e} ({diff / scale:.1e} of the largest logit)")
    assert diff < REL_TOL * scale, what
    return diff


def test_the_tolerance_catches_the_exact_erf_gelu_in_place_of_gpt2s_tanh_approximation(hub, monkeypatch):
    """The comparisons below would pass a model that computes GELU exactly, were the tolerance loose or the
    activations small: this is the check that they do not."""
    online(monkeypatch)
    cfg = hf.resolve(Config(init_from="tiny/tied", block_size=64, dropout=0.0), announce=False)
    model, x = load_pretrained(cfg, cfg.init_from).eval(), ids()
    with torch.no_grad():
        theirs = hub.models["tied"](x).logits
        report("tanh GELU, as GPT-2", nanoft_logits(model, x), theirs)
        gelu = torch.nn.functional.gelu
        monkeypatch.setattr(torch.nn.functional, "gelu", lambda t, approximate="none": gelu(t))  # exact erf
        with pytest.raises(AssertionError, match="erf GELU"):
            report("erf GELU", nanoft_logits(model, x), theirs)


# --- in: a GPT-2 by name ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["tied", "untied"])
def test_init_from_a_name_matches_transformers_logits_and_greedy_tokens(hub, layout, monkeypatch):
    online(monkeypatch)
    cfg = hf.resolve(Config(init_from=f"tiny/{layout}", block_size=1024, dropout=0.0))
    assert Path(cfg.init_from) == tokens.cache_dir() / "hf" / f"tiny--{layout}" / "model.safetensors"
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (2, 2, 32, 50257)
    assert cfg.block_size == 64 and cfg.tie_embeddings == (layout == "tied")  # capped at n_positions; the file's head
    model = load_pretrained(cfg, cfg.init_from).eval()
    theirs = hub.models[layout]
    assert (model.lm_head.weight is model.wte.weight) == (layout == "tied")  # untied: loaded, not replaced
    x = ids()
    with torch.no_grad():
        report(f"GPT-2 by name -> nanoft vs transformers ({layout})", nanoft_logits(model, x), theirs(x).logits)
    prompt = ids(T=8, seed=1)[:1]
    ours = torch.cat([t for t in model.generate(prompt, 16, temperature=0)], dim=1)
    reference = theirs.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[:, 8:]
    assert torch.equal(ours, reference)


def test_download_checks_the_published_sha256_follows_a_rename_and_caches(hub, monkeypatch):
    online(monkeypatch)
    hub.requests.clear()
    path = hf.fetch("renamed/tied")  # 307 to tiny/tied, whose weights 302 to /cdn with their sha256
    assert ("HEAD", "/tiny/tied/resolve/main/model.safetensors") in hub.requests
    assert path.read_bytes() == (hub.root / "tiny/tied/model.safetensors").read_bytes()
    hub.requests.clear()
    assert hf.fetch("renamed/tied") == path and hub.requests == []  # cached: no network at all
    monkeypatch.setenv("NANOFT_OFFLINE", "1")
    with pytest.raises(ValueError, match="NANOFT_OFFLINE"):
        hf.fetch("tiny/never-fetched")
    online(monkeypatch)
    shutil.copytree(hub.root / "tiny/tied", hub.root / "tiny/corrupt")
    hub.etags["tiny/corrupt"] = "0" * 64  # the published checksum disagrees with the bytes
    with pytest.raises(ValueError, match="sha256 mismatch"):
        hf.fetch("tiny/corrupt")
    cached = tokens.cache_dir() / "hf" / "tiny--corrupt"
    assert (cached / "model.safetensors.bad").exists() and not (cached / "model.safetensors").exists()  # set aside
    with pytest.raises(ValueError, match="no GPT-2 of that name on the Hub.*404"):
        hf.fetch("tiny/missing")


@pytest.mark.parametrize("setting, message", [
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06 is not supported"),
    ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
    ({"n_inner": 100}, "n_inner=100 is not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"add_cross_attention": True}, "add_cross_attention=True is not supported"),
    ({"model_type": "llama"}, "model_type 'llama' is not 'gpt2'"),
])
def test_what_nanoft_does_not_compute_is_refused_in_one_line_before_the_weights(hub, setting, message, monkeypatch):
    online(monkeypatch)
    repo = "bad/" + next(iter(setting))
    (hub.root / repo).mkdir(parents=True, exist_ok=True)
    config = {**GPT2Config(**SHAPE).to_dict(), **setting}
    (hub.root / repo / "config.json").write_text(json.dumps(config))
    (hub.root / repo / "model.safetensors").write_bytes(b"never fetched")
    hub.requests.clear()
    with pytest.raises(ValueError, match=message) as err:
        hf.resolve(Config(init_from=repo))
    assert "\n" not in str(err.value) and not any("safetensors" in path for _, path in hub.requests)


def test_a_bare_untied_file_is_loaded_untied_never_replaced(hub, tmp_path):
    shutil.copy(hub.root / "tiny/untied/model.safetensors", tmp_path)  # no config.json beside it
    path = str(tmp_path / "model.safetensors")
    cfg = hf.resolve(Config(init_from=path, n_layer=2, n_head=2, n_embd=32, vocab_size=50257, block_size=64))
    assert not cfg.tie_embeddings  # the file has its own head
    x = ids()
    with torch.no_grad():
        ours = nanoft_logits(load_pretrained(cfg, path).eval(), x)
        report("bare untied model.safetensors -> nanoft vs transformers", ours, hub.models["untied"](x).logits)
    with pytest.raises(ValueError, match="untied head"):
        load_pretrained(dataclasses.replace(cfg, tie_embeddings=True), path)


# --- train.py and sample.py by name, then out to transformers and peft, and back --------------------------

def test_train_py_and_sample_py_take_a_name_and_a_lora_run_exports_to_peft_and_back(hub, tmp_path, monkeypatch, capsys):
    import sample
    import train

    online(monkeypatch)
    hf.fetch("tiny/tied")  # then offline, as conftest has it: train.py and sample.py find the name in the cache
    monkeypatch.setenv("NANOFT_OFFLINE", "1")
    pairs = [{"prompt": f"Who says line {i}?", "response": f" SPEAKER {i % 3}"} for i in range(16)]
    sft = write_sft_jsonl(pairs, tmp_path / "pairs.jsonl")
    train.main(["configs/lora.py", "--init_from=tiny/tied", f"--out_dir={tmp_path / 'lora'}", f"--sft_data={sft}",
                "--max_iters=2", "--batch_size=2", "--eval_iters=1", "--eval_interval=2", "--log_interval=1",
                "--save_interval=2", "--warmup_iters=0", "--lr=5e-2", "--lora_targets=('q_proj', 'v_proj', 'fc_out')",
                "--dtype=float32"])  # float32 as transformers computes here: the comparison is then exact to rounding
    ck = checkpoint.load(tmp_path / "lora")
    assert ck.config["n_embd"] == 32 and ck.base_from.endswith("tiny--tied/model.safetensors")  # the file's shape won
    assert all(v.abs().sum() > 0 for k, v in ck.model.items() if k.endswith("lora_B"))  # trained: the fold shows
    assert "n_embd 128 -> 32" in capsys.readouterr().err  # and the difference was printed
    ours = sample.load_model(str(tmp_path / "lora")).eval()

    export(str(tmp_path / "lora"), str(tmp_path / "lora-hf"))
    peft_model = peft_over_its_base(tmp_path / "lora-hf")
    x = ids()
    with torch.no_grad():
        report("nanoft LoRA (q, v, fc_out + norms) -> peft", nanoft_logits(ours, x), peft_model(x).logits)
    import_peft(str(tmp_path / "lora-hf"), str(tmp_path / "lora-back"), base=str(tmp_path / "lora-hf" / "base"))
    back = checkpoint.load(tmp_path / "lora-back")
    assert set(back.model) == set(ck.model) and all(torch.equal(back.model[k], ck.model[k].float()) for k in ck.model)

    argv = ["sample.py", "tiny/tied", "--prompt=Who says", "--max_new_tokens=12", "--temperature=0"]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    sample.main()  # a name, from the cache now
    enc = sample.get_tokenizer()
    prompt = torch.tensor([enc.encode("Who says")])  # 2 tokens
    greedy = hub.models["tied"].generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 2:].tolist()
    streamed = b"".join(map(enc.decode_single_token_bytes, greedy))
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(streamed)
    assert capsys.readouterr().out == "Who says" + text + "\n"  # transformers' greedy tokens, as sample.py streams them


@pytest.mark.parametrize("layout", ["tied", "untied"])
def test_a_full_model_exports_to_transformers_and_reads_back_exactly(hub, tmp_path, monkeypatch, layout):
    online(monkeypatch)
    cfg = hf.resolve(Config(init_from=f"tiny/{layout}", dropout=0.0, finetune="full"))
    model = load_pretrained(cfg, cfg.init_from)
    with torch.no_grad():
        for p in model.parameters():  # "fine-tuned": every tensor moved, so each has to land in its place
            p.add_(torch.randn_like(p) * 0.01)
    checkpoint.save(tmp_path / "run", checkpoint.Checkpoint(step=1, config=cfg.to_dict(), model=model.state_dict()))
    export(str(tmp_path / "run"), str(tmp_path / "out"))
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    x = ids()
    with torch.no_grad():
        report(f"nanoft -> transformers ({layout})", nanoft_logits(model.eval(), x), theirs(x).logits)
    again = hf.resolve(Config(init_from=str(tmp_path / "out")))  # the exported folder is a GPT-2 source itself
    assert all(torch.equal(a, b) for a, b in zip(load_pretrained(again, again.init_from).state_dict().values(),
                                                 model.state_dict().values()))
    with pytest.raises(SystemExit, match=r"^error: --to .* is not empty; pick another folder, or --overwrite"):
        export_main([str(tmp_path / "run"), "--to", str(tmp_path / "out")])  # the command: one line, exit code 1


def lora_checkpoint(base: str, out: Path, **keys) -> Config:
    """A LoRA/QLoRA adapter checkpoint over `base` as train.py writes it, with random (non-zero) B's."""
    cfg = hf.resolve(Config(init_from=base, out_dir=str(out), dropout=0.0, lora_dropout=0.0, dtype="float32", **keys))
    model = apply_lora(load_pretrained(cfg, cfg.init_from), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    extra = {"adapter": adapter_config(cfg, cfg.init_from)}
    checkpoint.save(out, checkpoint.Checkpoint(step=1, config=cfg.to_dict(), model=adapter_state_dict(model),
                                               base_from=cfg.init_from, extra=extra))
    return cfg


def float32_lora_model(out_dir: Path):
    """An adapter checkpoint's model as sample.py builds it, in float32 (dtype "auto" may pick bf16 on this CPU)."""
    ck = checkpoint.load(out_dir)
    cfg = dataclasses.replace(Config.from_dict(ck.config), dtype="float32")
    model = apply_lora(load_pretrained(cfg, ck.base_from), cfg)
    load_adapter_state_dict(model, ck.model)
    return model.eval()


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_every_target_folds_exactly_into_peft_and_back(hub, tmp_path, monkeypatch, finetune):
    import sample

    online(monkeypatch)
    all_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
    lora_checkpoint("tiny/untied", tmp_path / "run", finetune=finetune, lora_r=4, lora_alpha=12.0,
                    lora_targets=all_targets)
    export(str(tmp_path / "run"), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"c_attn": 12} and config["alpha_pattern"] == {"c_attn": 36.0}  # 3 r, 3 alpha
    peft_model = peft_over_its_base(tmp_path / "hf")
    x = ids()
    with torch.no_grad():  # QLoRA: the base was written as the adapter saw it, NF4 round-tripped
        ours = nanoft_logits(sample.load_model(str(tmp_path / "run")).eval(), x)
        report(f"nanoft {finetune} (all six targets, untied head) -> peft", ours, peft_model(x).logits)
    import_peft(str(tmp_path / "hf"), str(tmp_path / "back"))  # the base it names: the exported one
    before, after = checkpoint.load(tmp_path / "run"), checkpoint.load(tmp_path / "back")
    assert after.config["lora_targets"] == list(all_targets) and after.config["lora_r"] == 4
    assert all(torch.equal(after.model[k], before.model[k]) for k in before.model)  # the very tensors


def test_an_adapter_trained_with_peft_imports_into_nanoft(hub, tmp_path, monkeypatch):
    online(monkeypatch)
    base = GPT2LMHeadModel.from_pretrained(hub.root / "tiny/tied")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                        rank_pattern={"c_attn": 6}, alpha_pattern={"c_attn": 12})  # the same alpha/r = 2 everywhere
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # dense B: every column feeds q, k and v
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(str(tmp_path / "peft"), str(tmp_path / "nano"), base="tiny/tied")
    ck = checkpoint.load(tmp_path / "nano")
    assert ck.config["lora_targets"] == ["q_proj", "k_proj", "v_proj", "fc_out"] and ck.config["lora_r"] == 6
    x = ids()
    with torch.no_grad():
        ours = nanoft_logits(float32_lora_model(tmp_path / "nano"), x)
        report("peft LoRA (c_attn r=6, mlp.c_proj r=4) -> nanoft", ours, peft_model.eval()(x).logits)

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    embedding = {"base_model.model.transformer.wte.lora_embedding_A": torch.zeros(4, 50257)}
    for bad, extra, message in (({"use_dora": True}, {}, "use_dora=True has no nanoft equivalent"),
                                ({"alpha_pattern": {"c_attn": 99}}, {}, "scales alpha/r differ"),
                                ({}, embedding, "transformer.wte.lora_embedding_A has no place in nanoft's LoRA")):
        (tmp_path / "bad").mkdir(exist_ok=True)
        save_file({**tensors, **extra}, str(tmp_path / "bad" / "adapter_model.safetensors"))
        cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError, match=message):
            import_peft(str(tmp_path / "bad"), str(tmp_path / "never"), base="tiny/tied")
        assert not (tmp_path / "never").exists()
