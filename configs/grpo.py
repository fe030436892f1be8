"""GRPO (Shao et al. 2024) of the 1,500-step CPU base against its reward model, on the plays' prompts: 4 responses
per prompt, each judged against its group; no value head. LoRA adapters (rank 8 on q and v); the reference is the
same model with them off.

    python train.py configs/grpo.py --init_from=out/tiny-1500 --reward_from=out/reward   # see configs/ppo.py first

Beside PPO's settings (configs/ppo.py): a rollout is 4 prompts x 4 samples (the same 16 responses a PPO rollout
has), beta = kl_coef = 0.05 on the k3 KL in the loss (trl's GRPO default is 0.0, no reference at all; DeepSeekMath
used 0.04), the same 4 passes x 2 minibatches per rollout.
"""
import dataclasses
import runpy
from pathlib import Path

config = dataclasses.replace(
    runpy.run_path(str(Path(__file__).with_name("ppo.py")))["config"],
    out_dir="out/grpo",
    finetune="grpo",
    batch_size=4,  # prompts per rollout
    rl_samples=4,  # the group size G
    kl_coef=0.05,
)
