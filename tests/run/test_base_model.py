"""A nanoft base brings its shape: every method started from a checkpoint of another shape than its config's
takes the checkpoint's, prints what changed, and refuses only what cannot be."""
import json
import subprocess
import sys

import pytest
from helpers import ROOT, torchrun

from nanoft.config import Config, ConfigError
from nanoft.run import checkpoint
from nanoft.run.base_model import take_base_shape

QUICK = ["--max_iters=2", "--warmup_iters=0", "--eval_interval=2", "--eval_iters=1", "--log_interval=1",
         "--compile=False", "--batch_size=4"]


def train(config: str, out, *extra: str, launcher=()) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *launcher, "train.py", config, f"--out_dir={out}", *QUICK, *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A base of another shape than every config's (configs/tiny.py is 4 x 128, block 128): 2 x 64, block 64."""
    out = tmp_path_factory.mktemp("base")
    train("configs/tiny.py", out, "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64")
    return out


@pytest.mark.parametrize("config, resume", [
    ("configs/lora.py", True), ("configs/qlora.py", False), ("configs/prefix.py", False), ("configs/dpo.py", False),
    ("configs/reward.py", False),
])
def test_every_method_takes_the_shape_of_the_base_it_starts_from(config, resume, small_base, tmp_path):
    """The shape is resolved before any method's code runs, so these stand for the others (full, adapter, distill's
    student): each was refused before, with a 'checkpoint has n_layer=2 but the config has n_layer=4' line."""
    r = train(config, tmp_path, f"--init_from={small_base}")
    assert f"{small_base}: the model's shape is its checkpoint's: n_layer 4 -> 2, n_head 4 -> 2, n_embd 128 -> 64" \
        in r.stderr
    saved = checkpoint.read_meta(tmp_path)["config"]
    assert (saved["n_layer"], saved["n_head"], saved["n_embd"]) == (2, 2, 64)
    if resume:  # and it resumes without repeating the shape
        train(config, tmp_path, "--init_from=resume", "--max_iters=3")
        assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_lora_under_torchrun_with_fsdp_takes_the_base_shape_too(small_base, tmp_path):
    r = train("configs/lora.py", tmp_path, f"--init_from={small_base}", "--fsdp=True", launcher=torchrun(2))
    assert "the model's shape is its checkpoint's: n_layer 4 -> 2" in r.stderr
    assert checkpoint.read_meta(tmp_path)["config"]["n_layer"] == 2


def test_only_what_cannot_be_is_refused(small_base, tmp_path):
    cfg = Config(init_from=str(small_base), block_size=256)  # a config file's larger context: cut to the base's
    assert take_base_shape(cfg, announce=False).block_size == 64
    with pytest.raises(ConfigError, match=r"^block_size=128 is above the base .*'s 64: its position embeddings end"):
        take_base_shape(Config(init_from=str(small_base), block_size=128), explicit={"block_size"})
    assert take_base_shape(Config(init_from=str(small_base), block_size=32), announce=False).block_size == 32
    r = subprocess.run([sys.executable, "train.py", "configs/lora.py", f"--out_dir={tmp_path}",
                        f"--init_from={small_base}", "--n_layer=3", *QUICK], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {small_base} has n_layer=2 but the config has n_layer=3")
