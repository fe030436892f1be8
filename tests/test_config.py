"""Config files and --key=value overrides: typed, checked, with one-line errors naming the key."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanoft.config import Config, ConfigError, describe, load_config
from nanoft.objectives import method_of
from nanoft.optim import optimizer_class

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_file_loads():
    for path in sorted((ROOT / "configs").glob("*.py")):
        assert isinstance(load_config(str(path), []), Config), path


def test_overrides_are_parsed_and_typed():
    cfg = load_config(str(ROOT / "configs/tiny.py"), ["--lr=3e-4", "--optimizer=adamw8bit", "--compile=True",
                                                      "--max_iters=7", "--warmup_iters=5", "--lora_targets=['q_proj','k_proj']", "--min_lr=0"])
    assert (cfg.lr, cfg.optimizer, cfg.compile, cfg.max_iters) == (3e-4, "adamw8bit", True, 7)
    assert cfg.lora_targets == ("q_proj", "k_proj") and cfg.min_lr == 0


def test_unknown_key_names_the_nearest_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'.*") as e:
        load_config(str(ROOT / "configs/tiny.py"), ["--learning_rat=1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean .*batch_size"):
        load_config(str(ROOT / "configs/tiny.py"), ["--batchsize=4"])
    assert "\n" not in str(e.value)


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(ConfigError, match=r"'max_iters' expects int, got 'ten' \(str\)"):
        load_config(str(ROOT / "configs/tiny.py"), ["--max_iters=ten"])
    with pytest.raises(ConfigError, match=r"'compile' expects bool or str, got 1 \(int\)"):
        load_config(str(ROOT / "configs/tiny.py"), ["--compile=1"])
    with pytest.raises(ConfigError, match="'optimizer' must be one of adamw, adamw8bit"):
        optimizer_class(load_config(str(ROOT / "configs/tiny.py"), ["--optimizer=sgd"]).optimizer)  # its table
    with pytest.raises(ConfigError, match="'finetune' must be one of none, full, lora"):
        method_of(load_config(str(ROOT / "configs/tiny.py"), ["--finetune=sft"]))


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.py"), [])
    (tmp_path / "typo.py").write_text("from nanoft.config import Config\nconfig = Config(n_layr=2)\n")
    with pytest.raises(ConfigError, match="unknown config key 'n_layr'; did you mean n_layer"):
        load_config(str(tmp_path / "typo.py"), [])
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define `config = Config"):
        load_config(str(tmp_path / "empty.py"), [])


def test_help_lists_every_key_with_its_comment():
    text = describe()
    assert "--grad_accum=1  (int)  micro-batches accumulated per optimizer step" in text
    out = subprocess.run([sys.executable, "train.py", "configs/100m.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for key in ("out_dir", "warmup_iters", "optimizer", "finetune", "lora_targets", "fsdp"):
        assert f"--{key}=" in out


def test_train_py_reports_bad_input_in_one_line():
    r = subprocess.run([sys.executable, "train.py", "configs/tiny.py", "--lr=fast"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip() == "error: config key 'lr' expects float, got 'fast' (str)"


@pytest.mark.parametrize("override, message", [
    ("--lr=0", "'lr' must be a finite number > 0; got 0"),
    ("--lr=-1e-3", "'lr' must be a finite number > 0"),
    ("--min_lr=1.0", "'min_lr' must be between 0 and lr"),
    ("--warmup_iters=-1", "'warmup_iters' must be at least 0; got -1"),  # longer than the run is fine
    ("--batch_size=0", "'batch_size' must be at least 1; got 0"),
    ("--vocab_size=-5", "'vocab_size' must be at least 1"),
    ("--dropout=1.0", "'dropout' must be in [0, 1); got 1.0"),
    ("--beta2=1", "'beta2' must be in [0, 1)"),
    ("--eps=0", "'eps' must be in (0, 1)"),
    ("--grad_clip=-1", "'grad_clip' must be a finite number >= 0"),
    ("--max_bad_steps=0", "'max_bad_steps' must be at least 1"),
    ("--dist_timeout=0", "'dist_timeout' must be at least 1"),
    ("--out_dir=", "'out_dir' must be not empty"),
])
def test_out_of_range_values_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(str(ROOT / "configs/tiny.py"), [override])
    assert "\n" not in str(e.value)


def test_a_config_file_that_does_not_run_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from nanoft.config import Config\nconfig = Config(lr=1e-3\n")
    r = subprocess.run([sys.executable, "train.py", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == f"error: {bad}, line 2: syntax error: '(' was never closed\n"
    bad.write_text("from nanoft.config import Config\n\nconfig = Config(lr=1 / 0)\n")
    with pytest.raises(ConfigError, match=r"bad.py, line 3: ZeroDivisionError: division by zero"):
        load_config(str(bad), [])
    bad.write_text("from nanoft.config import Config\nconfig = Config(dropout=2.0)\n")
    with pytest.raises(ConfigError, match=r"bad.py: config key 'dropout' must be in \[0, 1\); got 2.0"):
        load_config(str(bad), [])
