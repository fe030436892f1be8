"""`python -m nanoft quantize` and `python -m nanoft evaluate` as a user runs them: on a small trained run, every
method writes a checkpoint that evaluate, sample.py and train.py --init_from read, and evaluate scores the very
batches train.py scored."""
import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file

from nanoft.config import Config
from nanoft.interop.pretrained import load_model
from nanoft.quant import Int4Linear, Int8Linear, Linear4bit
from nanoft.run import checkpoint
from nanoft.tools import evaluate, quantize
from nanoft.tools.memory.estimate import inference_bytes
from nanoft.tools.memory.shape import ModelShape

SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=4", "--max_iters=2",
         "--warmup_iters=0", "--eval_interval=2", "--eval_iters=2", "--log_interval=1", "--compile=False", "--dtype=float32"]
LINE = re.compile(r"^val loss (\d+\.\d{4}) \(perplexity (\d+\.\d{2})\)$")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run("train.py", "configs/tiny.py", f"--out_dir={out}", *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def val_loss(capsys, *argv: str) -> float:
    evaluate.main(list(argv))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = LINE.match(last)
    assert m, last
    assert abs(float(m[2]) - torch.tensor(float(m[1])).exp().item()) < 0.01 * float(m[2])
    return float(m[1])


def test_evaluate_scores_the_batches_train_py_scored(trained, capsys):
    logged = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    first = val_loss(capsys, str(trained), "--eval_iters=2")
    assert first == pytest.approx(logged, abs=1e-4)
    assert val_loss(capsys, str(trained), "--eval_iters=2") == first  # the same batches every time
    assert val_loss(capsys, str(trained), "--eval_iters=1") != first  # fewer batches: another number


@pytest.mark.parametrize("method, layer_class", [
    (["--method=rtn", "--bits=8"], Int8Linear),
    (["--method=rtn", "--bits=4", "--group_size=32"], Int4Linear),
    (["--method=gptq", "--bits=4", "--group_size=32", "--act_order", "--calib_tokens=512"], Int4Linear),
    (["--method=gptq", "--bits=8", "--calib_tokens=512"], Int8Linear),
    (["--method=awq", "--bits=4", "--group_size=32", "--calib_tokens=512"], Int4Linear),
    (["--method=nf4"], Linear4bit),
], ids=["rtn8", "rtn4", "gptq4-act-order", "gptq8", "awq4", "nf4"])
def test_every_method_writes_a_checkpoint_that_loads_quantized_and_scores_close_to_float(
        method, layer_class, trained, tmp_path, capsys):
    quantize.main([str(trained), f"--to={tmp_path}", *method])
    meta = checkpoint.read_meta(tmp_path)
    quant = meta["extra"]["quant"]
    assert len(quant["layers"]) == 2 * 6 and quant["method"] == method[0].split("=")[1]
    # the memory estimator's size of these weights: exact (nf4: its shared code tables, stored per layer, aside)
    stored = sum(t.numel() * t.element_size() for k, t in load_file(tmp_path / meta["tensors"]).items())
    shape = ModelShape.from_config(Config.from_dict(meta["config"]))
    estimate = inference_bytes(shape, quant["format"], **({"group_size": 32} if quant["format"] == "int4" else {}))
    assert stored == estimate if quant["format"] != "nf4" else 0 < stored - estimate < 0.005 * stored
    model = load_model(str(tmp_path)).eval()
    assert isinstance(model.blocks[1].mlp.fc_out, layer_class) and isinstance(model.lm_head, torch.nn.Linear)
    float_model = load_model(str(trained)).eval()
    x = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        got, want = model(x), float_model(x)
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < (0.01 if "--bits=8" in method else 0.1), rel  # quantized, and close
    float_loss = val_loss(capsys, str(trained), "--eval_iters=2")
    assert val_loss(capsys, str(tmp_path), "--eval_iters=2") == pytest.approx(float_loss, abs=0.05)
    if quant["format"] == "int4":  # how far from the float model: some, and nothing from itself
        assert 0 < kl(capsys, str(tmp_path), str(trained)) < 0.05
        assert kl(capsys, str(tmp_path), str(tmp_path)) == 0


def kl(capsys, checkpoint_dir: str, against: str) -> float:
    evaluate.main([checkpoint_dir, "--eval_iters=1", "--batch_size=1", f"--against={against}"])
    line = capsys.readouterr().out.strip().splitlines()[-2]
    assert line.startswith(f"KL({against} || {checkpoint_dir}) ") and line.endswith(" nats per token"), line
    return float(line.split()[-4])


def test_sample_and_init_from_read_a_quantized_checkpoint(trained, tmp_path):
    q = tmp_path / "q"
    quantize.main([str(trained), f"--to={q}", "--method=rtn", "--bits=4", "--group_size=32"])
    r = run("sample.py", str(q), "--max_new_tokens=5", "--prompt=ROMEO:")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr[-2000:]
    r = run("train.py", "configs/tiny.py", f"--init_from={q}", f"--out_dir={tmp_path / 'ft'}", *SMALL[4:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert checkpoint.read_meta(tmp_path / "ft")["config"]["n_layer"] == 2  # the quantized base's shape


def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path):
    r = run("-m", "nanoft", "quantize", str(trained), f"--to={tmp_path / 'x'}", "--method=awq", "--bits=8")
    assert r.returncode != 0 and r.stderr.strip() == "error: --method awq quantizes to 4 bits (--bits 4); for 8 " \
        "bits use rtn or gptq"
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="does not divide the layer width 64"):
        quantize.main([str(trained), f"--to={tmp_path / 'y'}", "--method=rtn", "--group_size=48"])
    with pytest.raises(ValueError, match="already holds a checkpoint: pass --overwrite"):
        quantize.main([str(trained), f"--to={trained.parent}", "--method=rtn"]) if checkpoint.exists(trained.parent) \
            else quantize.main([str(trained), f"--to={trained / checkpoint.BEST_DIR}", "--method=rtn"])
