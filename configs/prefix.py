"""Prefix tuning (Li & Liang 2021) of the CPU base (out/tiny) on the embedded speaker task: 10 trained key/value
positions in front of every layer's attention, produced while training by a small MLP (hidden width 128) and
folded into the keys and values themselves when saved; the model itself frozen. Same data, steps and batches as
configs/lora.py.

    python train.py configs/tiny.py       # first: the base checkpoint in out/tiny (~5 minutes)
    python train.py configs/prefix.py     # saves the folded prefixes (10,240 numbers) for sample.py, the MLP for resuming
    python sample.py out/prefix --prompt "..."   # applies the prefixes to their base (they cannot be merged into it)
"""
import dataclasses
import runpy
from pathlib import Path

config = dataclasses.replace(
    runpy.run_path(str(Path(__file__).with_name("lora.py")))["config"],
    out_dir="out/prefix",
    finetune="prefix",
    prefix_len=10,  # the paper's length for table-to-text
    prefix_hidden=128,  # the paper uses 512 for GPT-2 (n_embd 1024); the MLP scales with n_embd * hidden
    lr=5e-3,
    min_lr=5e-4,
)
