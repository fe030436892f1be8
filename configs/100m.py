"""The 100M-parameter pretraining exercise on Shakespeare (GPU-sized; runs on CPU too, slowly).

The usual GPT-2-small recipe: AdamW, peak lr 6e-4, 100 warmup iterations then cosine decay to min_lr, grad clip 1.0.
Shape: GPT-2 small's width (768, 12 heads of 64) at 9 layers = ~103M parameters with the tied head.

Data: the embedded Shakespeare has 1.30M training tokens, and this schedule trains on 2000 x 16,384 = 32.8M,
so it sees each token ~25 times: a 100M model can memorise much of that, and validation loss may turn up before the
end. out_dir/best keeps the weights with the lowest validation loss (`python sample.py out/100m --best`).
For a data set this size is meant for, train on TinyStories (2.2 GB of text, some 500M tokens; slow to prepare):

    python data/prepare.py tinystories && python train.py configs/100m.py --dataset=tinystories
"""
from nanoft.config import Config

config = Config(
    out_dir="out/100m",
    max_iters=2000,
    eval_interval=250,
    eval_iters=20,
    log_interval=10,
    save_interval=250,
    batch_size=8,
    block_size=512,
    grad_accum=4,  # 8 x 512 x 4 = 16k tokens per optimizer step
    n_layer=9,
    n_head=12,
    n_embd=768,
    dropout=0.0,
    optimizer="adamw",
    lr=6e-4,
    min_lr=6e-5,
    warmup_iters=100,
    weight_decay=0.1,
    grad_clip=1.0,
)
