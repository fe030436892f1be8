"""LoRA (r=8 on q, v) fine-tuning of the ~100M base (out/100m, made by
configs/100m.py) on the embedded speaker task: configs/lora.py at the 100M shape, for a GPU.

    python train.py configs/100m.py && python train.py configs/lora_100m.py
"""
import dataclasses
import runpy
from pathlib import Path

here = Path(__file__).parent
base = runpy.run_path(str(here / "100m.py"))["config"]
config = dataclasses.replace(
    runpy.run_path(str(here / "lora.py"))["config"],
    out_dir="out/lora_100m",
    init_from="out/100m",
    n_layer=base.n_layer, n_head=base.n_head, n_embd=base.n_embd,  # the base's shape
    block_size=128,  # shorter than the base's context is fine: the task's examples are ~30 tokens
    max_iters=300, eval_interval=100, save_interval=300,
    lr=1e-3, min_lr=1e-4,

    device="auto",
)
