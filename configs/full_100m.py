"""Full fine-tuning of the ~100M base (out/100m, made by
configs/100m.py) on the embedded speaker task: the GPU-sized sibling of configs/full.py (device auto:
bfloat16 autocast on CUDA).

    python train.py configs/100m.py && python train.py configs/full_100m.py
"""
from nanoft.config import Config

config = Config(
    out_dir="out/full_100m",
    init_from="out/100m",
    finetune="full",
    sft_data="",  # empty: the embedded speaker task (data/speaker_task/*.jsonl)
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
    optimizer="adamw",
    lr=5e-5,  # well below pretraining's 6e-4: move every weight a little, not relearn the base
    min_lr=5e-6,
    warmup_iters=10,
    weight_decay=0.0,
    dropout=0.0,
)
