"""Full fine-tuning of the CPU base (out/tiny) on the embedded speaker task: every weight trains.

    python train.py configs/tiny.py     # first: the base checkpoint in out/tiny (~5 minutes)
    python train.py configs/full.py     # ~3 minutes on 2 CPU cores; prints the speaker-task accuracy
Compare with configs/lora.py and configs/qlora.py (same data, steps and batches): bench/compare_finetune.py.
"""
from nanoft.config import Config

config = Config(
    out_dir="out/full",
    init_from="out/tiny",
    finetune="full",
    sft_data="",  # empty: the embedded speaker task (data/speaker_task/*.jsonl)
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
    lr=1e-3,  # half of pretraining's 2e-3: the task is new to the base, but every weight moves
    min_lr=1e-4,
    warmup_iters=10,
    weight_decay=0.0,
    dropout=0.0,
    device="cpu",
)
