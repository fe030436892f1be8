"""CPU-sized pretraining on Shakespeare: about 5 minutes on 2 cores. python train.py configs/tiny.py"""
from nanoft.config import Config

config = Config(
    out_dir="out/tiny",
    max_iters=300,
    eval_interval=100,
    eval_iters=10,
    log_interval=10,
    save_interval=100,
    batch_size=16,
    block_size=128,
    n_layer=4,
    n_head=4,
    n_embd=128,
    lr=2e-3,
    min_lr=2e-4,
    warmup_iters=30,
    weight_decay=0.1,
    device="cpu",
)
