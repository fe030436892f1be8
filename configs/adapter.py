"""Adapter tuning (Houlsby et al. 2019) of the CPU base (out/tiny) on the embedded speaker task: a bottleneck of
width 16 after each block's attention and MLP (up-projection zero at the start, so training starts from the base
itself), the LayerNorms trained too, the rest frozen. Same data, steps and batches as configs/lora.py.

    python train.py configs/tiny.py       # first: the base checkpoint in out/tiny (~5 minutes)
    python train.py configs/adapter.py    # saves only the adapters and the norms (36,224 numbers)
    python sample.py out/adapter --prompt "..."   # applies them to their base (they cannot be merged into it)
"""
import dataclasses
import runpy
from pathlib import Path

config = dataclasses.replace(
    runpy.run_path(str(Path(__file__).with_name("lora.py")))["config"],
    out_dir="out/adapter",
    finetune="adapter",
    adapter_size=16,  # 2 * 16 * 128 + 16 + 128 = 4,240 numbers per adapter, 8 adapters
    lr=1e-2,
    min_lr=1e-3,
)
