"""LoRA fine-tuning (r=8 on q, v) of the ~100M base (out/100m, made by
configs/100m.py) on the embedded speaker task: the GPU-sized sibling of configs/lora.py (device auto:
bfloat16 autocast on CUDA).

    python train.py configs/100m.py && python train.py configs/lora_100m.py
"""
from nanoft.config import Config

config = Config(
    out_dir="out/lora_100m",
    init_from="out/100m",
    finetune="lora",
    sft_data="",  # empty: the embedded speaker task (data/speaker_task/*.jsonl)
    lora_r=8,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_targets=("q_proj", "v_proj"),  # the LoRA paper's default; add out_proj, fc_in, fc_out for more capacity
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
    lr=1e-3,  # adapters start at zero and are few: they take a ~10x larger step than full fine-tuning
    min_lr=1e-4,
    warmup_iters=10,
    weight_decay=0.0,
)
