"""QLoRA fine-tuning of the CPU base (out/tiny) on the embedded speaker task: the frozen linear layers of
every block held as 4-bit NormalFloat with double quantization, rank-8 adapters in float32 on top
(bfloat16 on CUDA), paged 8-bit AdamW. Same data, steps and learning rate as configs/lora.py, so the two
differ only by the quantized base and the 8-bit optimizer states.

    python train.py configs/tiny.py     # first: the base checkpoint in out/tiny (~5 minutes)
    python train.py configs/qlora.py
    python -m nanoft.lora merge --adapter out/qlora --out out/qlora-merged && python sample.py out/qlora-merged
"""
from nanoft.config import Config

config = Config(
    out_dir="out/qlora",
    init_from="out/tiny",
    finetune="qlora",
    sft_data="",  # empty: the embedded speaker task (data/speaker_task/*.jsonl)
    lora_r=8,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_targets=("q_proj", "v_proj"),
    nf4_blocksize=64,
    double_quant=True,
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
    optimizer="paged_adamw8bit",  # QLoRA's optimizer: 8-bit states, paged to host memory under pressure
    min_8bit_size=1024,  # the tiny model's adapters have 1,024 elements each: below the default 4096 they
                         # would keep 32-bit states and the 8-bit optimizer would save nothing here
    lr=1e-2,  # as configs/lora.py
    min_lr=1e-3,
    warmup_iters=10,
    weight_decay=0.0,
    device="cpu",
)
