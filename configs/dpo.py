"""DPO (Rafailov et al. 2023) of the CPU base (out/tiny) on the plays' preference set: prompt = the opening of a
speech, chosen = its true next line, rejected = another speech's next line of the same length (nanoft/data/preferences.py).
LoRA adapters train (rank 8 on q and v); the reference is the same model with them switched off.

    python train.py configs/tiny.py --max_iters=1500 --out_dir=out/tiny-1500   # first: a base (15 min on 2 cores)
    python train.py configs/dpo.py --init_from=out/tiny-1500   # prints the held-out accuracies before and after

The base must know more than the plays' word frequencies for the preference to be learnable. Measured on 2 cores
with these settings: on configs/tiny.py's 300-step base (val 5.53) DPO moved held-out pairs at chance (reward
accuracy 0.543, the model's own preference 0.530 -> 0.537); on a 1,500-step base (val 4.85), reward accuracy 0.667
and the model's own preference accuracy 0.563 -> 0.597 (300 held-out pairs; standard error 0.029).
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
    max_iters=300,
    eval_interval=100,
    eval_iters=8,
    log_interval=5,
    save_interval=100,
    batch_size=8,  # pairs per batch: 16 rows (chosen, then rejected)
    optimizer="adamw",
    lr=1e-3,  # 5e-3 for 60 steps over-fitted the train pairs (held-out reward accuracy 0.623, not 0.667)
    min_lr=1e-4,
    warmup_iters=5,
    weight_decay=0.0,
    device="cpu",
)
