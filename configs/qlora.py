"""QLoRA fine-tuning of the CPU base (out/tiny) on the embedded speaker task: the frozen linear layers of
every block held as 4-bit NormalFloat with double quantization, rank-8 adapters in float32 on top
(bfloat16 on CUDA), paged 8-bit AdamW. Same data, steps and learning rate as configs/lora.py, so the two
differ only by the quantized base and the 8-bit optimizer states.

    python train.py configs/tiny.py     # first: the base checkpoint in out/tiny (~5 minutes)
    python train.py configs/qlora.py
    python -m nanoft merge --adapter out/qlora --out out/qlora-merged && python sample.py out/qlora-merged
"""
import dataclasses
import runpy
from pathlib import Path

# configs/lora.py with two changes, so that the two runs differ only by the quantized base and the optimizer
config = dataclasses.replace(
    runpy.run_path(str(Path(__file__).with_name("lora.py")))["config"],
    out_dir="out/qlora",
    finetune="qlora",
    nf4_blocksize=64,
    double_quant=True,
    optimizer="paged_adamw8bit",  # QLoRA's optimizer: 8-bit states, paged to host memory under pressure
    min_8bit_size=1024,  # the tiny model's adapters have 1,024 elements each: below the default 4096 they
                         # would keep 32-bit states and the 8-bit optimizer would save nothing here
)
