"""Full fine-tuning of the CPU base (out/tiny) on the embedded speaker task: every weight trains.

    python train.py configs/tiny.py     # first: the base checkpoint in out/tiny (~5 minutes)
    python train.py configs/full.py     # ~5 minutes on 2 CPU cores; then scores its answers on the val split
Compare with configs/lora.py and configs/qlora.py (same data, steps and batches): bench/compare_finetune.py.
"""
import dataclasses
import runpy
from pathlib import Path

# configs/lora.py's data, shape, steps and batches, with every weight trainable
config = dataclasses.replace(
    runpy.run_path(str(Path(__file__).with_name("lora.py")))["config"],
    out_dir="out/full",
    finetune="full",
    lr=1e-3,  # half of pretraining's 2e-3: the task is new to the base, but every weight moves
    min_lr=1e-4,
    dropout=0.0,
)
