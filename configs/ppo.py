"""PPO (RLHF's third stage, Ouyang et al. 2022) of the 1,500-step CPU base against its reward model, on the plays'
prompts (a speech's opening; the reward model prefers its true next line). LoRA adapters train (rank 8 on q and v)
with a zero-initialised value head on the shared trunk; the reference is the same model with the adapters off.

    python train.py configs/tiny.py --max_iters=1500 --out_dir=out/tiny-1500           # a base (see configs/dpo.py)
    python train.py configs/reward.py --init_from=out/tiny-1500                        # its reward model, out/reward
    python train.py configs/ppo.py --init_from=out/tiny-1500 --reward_from=out/reward  # prints before -> after

Where it differs from trl's PPO defaults (4 epochs, 1 minibatch, clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1,
lambda 0.95, kl_coef 0.05, temperature 0.7; all kept): 2 minibatches per pass, so each rollout of 16 responses
feeds 8 optimizer steps and the clip has steps to act on; responses of at most 24 tokens ending at a newline
(the pairs' responses are one line); lr 1e-3, LoRA's usual rate (trl's 3e-6 is for full weights of large models).
"""
import dataclasses
import runpy
from pathlib import Path

config = dataclasses.replace(
    runpy.run_path(str(Path(__file__).with_name("dpo.py")))["config"],
    out_dir="out/ppo",
    finetune="ppo",
    finetune_weights="lora",  # full | lora | qlora
    reward_from="out/reward",
    batch_size=16,  # prompts per rollout
    rl_samples=1,
    rl_epochs=4,
    rl_minibatches=2,
    rl_max_new_tokens=24,
    rl_temperature=0.7,
    rl_stop="newline",
    rl_clip=0.2,
    kl_coef=0.05,
    kl_estimator="k1",
    vf_coef=0.1,
    vf_clip=0.2,
    gae_gamma=1.0,
    gae_lambda=0.95,
    max_iters=400,  # 50 rollouts
    eval_interval=100,
    eval_iters=4,  # 64 val prompts, greedy
    save_interval=100,
    lr=1e-3,
    min_lr=1e-4,
    warmup_iters=8,
)
