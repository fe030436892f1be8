"""LoRA fine-tuning of the CPU base (out/tiny) on the embedded speaker task: rank-8 adapters on the
attention query and value projections, plus the LayerNorms; everything else frozen.

    python train.py configs/tiny.py     # first: the base checkpoint in out/tiny (~5 minutes)
    python train.py configs/lora.py     # ~4 minutes on 2 CPU cores; saves only the adapter (~80 KB)
    python -m nanoft merge --adapter out/lora --out out/lora-merged && python sample.py out/lora-merged
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
    # the LayerNorms train too (2,304 numbers here): this 5-minute base's frozen final norm and tied head cap
    # how likely any token can be made (<|endoftext|>: -log p >= 6.3 whatever the adapters do); see
    # nanoft/peft/lora.py's apply_lora
    lora_train_norms=True,
    # the base's shape (configs/tiny.py); a shorter context is fine: the task's examples are ~30 tokens
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=64,
    max_iters=600,  # 6 epochs of the 3,227 examples; the adapters are still learning the answer format at 300
    eval_interval=100,
    eval_iters=10,
    log_interval=10,
    save_interval=600,
    batch_size=32,
    optimizer="adamw",
    lr=2e-2,  # adapters start at zero and are few: they take a ~20x larger step than full fine-tuning
    min_lr=2e-3,
    warmup_iters=10,
    weight_decay=0.0,
    device="cpu",
)
