"""nanoft: a from-scratch GPT pretraining and fine-tuning framework, written to be read.

Where a concept lives, from the bottom up (a package imports only those above it in this list, tests/test_layers.py):

    config.py     the typed Config: config files, --key=value overrides, --help
    kernels/      Triton kernels and CPU fast paths, each beside its PyTorch reference (the repo's kernels/ folder)
    data/         token files, SFT and preference data, corpora, the tokenizer
    quant/        quantized weights (NF4)
    optim/        the optimizer table: AdamW, 8-bit, paged, Adafactor, Lion; the lr schedule
    model/        the GPT, its chunked LM-head loss, log-probabilities
    run/          checkpoints, out_dir lock, resume, step guard, stop requests, distributed, precision, progress
    peft/         LoRA, QLoRA, prefix tuning, adapter layers
    objectives/   the method table: next-token, DPO, reward model, distillation, PPO, GRPO
    interop/      Hugging Face's GPT-2 in and out
    tools/        the commands: python -m nanoft memory | check | export | merge | plot | reward

train.py (the loop) and sample.py sit above all of them, at the top of the repository.
"""
