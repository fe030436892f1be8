"""LoRA fine-tuning of the CPU base (out/tiny) on the embedded speaker task: rank-8 adapters on the
attention query and value projections; everything else frozen.

    python train.py configs/tiny.py     # first: the base checkpoint in out/tiny (~5 minutes)
    python train.py configs/lora.py     # ~3 minutes on 2 CPU cores; saves only the adapter (a few KB)
    python -m nanoft.lora merge --adapter out/lora --out out/lora-merged && python sample.py out/lora-merged
"""
from nanoft.config import Config

config = Config(
    out_dir="out/lora",
    init_from="out/tiny",
    finetune="lora",
    sft_data="",  # empty: the embedded speaker task (data/speaker_task/*.jsonl)
    lora_r=8,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_targets=("q_proj", "v_proj"),  # the LoRA paper's default; add out_proj, fc_in, fc_out for more capacity
    # the base's shape (configs/tiny.py); a shorter context is fine: the task's examples are ~30 tokens
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=64,
    max_iters=150,
    eval_interval=50,
    eval_iters=10,
    log_interval=10,
    save_interval=150,
    batch_size=32,
    optimizer="adamw",
    lr=1e-2,  # adapters start at zero and are few: they take a ~10x larger step than full fine-tuning
    min_lr=1e-3,
    warmup_iters=10,
    weight_decay=0.0,
    device="cpu",
)
