"""QLoRA fine-tuning (NF4 base, r=8 on q, v, paged 8-bit AdamW) of the ~100M base (out/100m, made by
configs/100m.py) on the embedded speaker task: the GPU-sized sibling of configs/qlora.py (device auto:
bfloat16 autocast on CUDA).

    python train.py configs/100m.py && python train.py configs/qlora_100m.py
"""
from nanoft.config import Config

config = Config(
    out_dir="out/qlora_100m",
    init_from="out/100m",
    finetune="qlora",
    sft_data="",  # empty: the embedded speaker task (data/speaker_task/*.jsonl)
    lora_r=8,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_targets=("q_proj", "v_proj"),
    nf4_blocksize=64,
    double_quant=True,
    # the base's shape (configs/100m.py); a shorter context is fine: the task's examples are ~30 tokens
    n_layer=9,
    n_head=12,
    n_embd=768,
    block_size=128,
    max_iters=300,
    eval_interval=100,
    eval_iters=10,
    log_interval=10,
    save_interval=300,
    batch_size=32,
    optimizer="paged_adamw8bit",  # QLoRA's optimizer: 8-bit states, paged to host memory under pressure
    min_8bit_size=4096,  # 768-wide adapters (6,144 elements each) get 8-bit states at the default
    lr=1e-3,
    min_lr=1e-4,
    warmup_iters=10,
    weight_decay=0.0,
)
