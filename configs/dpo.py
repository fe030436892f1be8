"""DPO (Rafailov et al. 2023) of the CPU base (out/tiny) on the plays' preference set: prompt = the opening of a
speech, chosen = its true next line, rejected = another speech's next line of the same length (nanoft/preferences.py).
LoRA adapters train (rank 8 on q and v); the reference is the same model with them switched off.

    python train.py configs/tiny.py     # first: the base checkpoint in out/tiny
    python train.py configs/dpo.py      # prints the held-out preference accuracy of the reference and the result
    python train.py configs/dpo.py --finetune_weights=full --lr=1e-4 --min_lr=1e-5 --out_dir=out/dpo-full   # a frozen copy as reference
"""
from nanoft.config import Config

config = Config(
    out_dir="out/dpo",
    init_from="out/tiny",
    finetune="dpo",
    finetune_weights="lora",  # full | lora | qlora
    dpo_beta=0.1,  # the paper's default
    preference_data="",  # empty: the embedded plays set; or JSONL of {"prompt","chosen","rejected"}
    lora_r=8,
    lora_alpha=16.0,
    lora_dropout=0.0,  # no dropout: the policy starts equal to its reference (loss log 2, every reward 0)
    lora_targets=("q_proj", "v_proj"),
    # the base's shape (configs/tiny.py); the pairs are 25-70 tokens
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=64,
    max_iters=60,
    eval_interval=20,
    eval_iters=8,
    log_interval=5,
    save_interval=60,
    batch_size=8,  # pairs per batch: 16 rows (chosen, then rejected)
    optimizer="adamw",
    lr=5e-3,
    min_lr=5e-4,
    warmup_iters=5,
    weight_decay=0.0,
    device="cpu",
)
