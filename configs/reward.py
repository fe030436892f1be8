"""A reward model (RLHF's second stage, Ouyang et al. 2022) from the CPU base (out/tiny): a scalar head on the last
token of prompt + response, trained with the Bradley-Terry loss on the plays' preference set (configs/dpo.py's pairs).
Every weight trains. The third stage trains a policy against it: configs/ppo.py, configs/grpo.py.

    python train.py configs/tiny.py --max_iters=1500 --out_dir=out/tiny-1500   # first: a base (see configs/dpo.py)
    python train.py configs/reward.py --init_from=out/tiny-1500   # held-out pairwise accuracy: 0.657 measured
    python -m nanoft reward out/reward --prompt "ROMEO:\n..." --response "..." --response "..."
"""
import dataclasses
import runpy
from pathlib import Path

config = dataclasses.replace(
    runpy.run_path(str(Path(__file__).with_name("dpo.py")))["config"],
    out_dir="out/reward",
    finetune="reward",
    finetune_weights="full",
    lr=3e-4,  # every weight moves, as in full fine-tuning
    min_lr=3e-5,
    weight_decay=0.0,
    max_iters=200,
    eval_interval=100,
    save_interval=200,
)
