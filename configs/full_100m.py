"""Full fine-tuning of the ~100M base (out/100m, made by configs/100m.py) on the embedded speaker task:
configs/full.py at the 100M shape, for a GPU (device auto: bfloat16 autocast on CUDA).

    python train.py configs/100m.py && python train.py configs/full_100m.py
"""
import dataclasses
import runpy
from pathlib import Path

here = Path(__file__).parent
base = runpy.run_path(str(here / "100m.py"))["config"]
config = dataclasses.replace(
    runpy.run_path(str(here / "full.py"))["config"],
    out_dir="out/full_100m",
    init_from="out/100m",
    n_layer=base.n_layer, n_head=base.n_head, n_embd=base.n_embd,  # the base's shape
    block_size=128,  # shorter than the base's context is fine: the task's examples are ~30 tokens
    max_iters=300, eval_interval=100, save_interval=300,
    lr=5e-5, min_lr=5e-6,  # well below pretraining's 6e-4: move every weight a little, not relearn the base
    device="auto",
)
