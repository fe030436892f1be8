"""nanoft: a from-scratch GPT pretraining and fine-tuning framework, written to be read.

Where a concept lives, from the bottom up (a package imports only those above it in this list, tests/test_layers.py):

    config.py     the typed Config: config files, --key=value overrides, --help
    kernels/      Triton kernels and CPU fast paths, each beside its PyTorch reference (the repo's kernels/ folder)
    data/         token files, SFT and preference data, corpora, the tokenizer
    quant/        quantized weights: NF4, INT8, INT4; GPTQ and AWQ; llama.cpp's Q8_0 and Q4_0 blocks
    optim/        the optimizer table: AdamW, 8-bit, paged, Adafactor, Lion; the lr schedule
    model/        the GPT, its chunked LM-head loss, log-probabilities
    run/          checkpoints, out_dir lock, resume, step guard, stop requests, distributed, precision, progress
    peft/         LoRA, QLoRA, prefix tuning, adapter layers
    objectives/   the method table: next-token, DPO, reward model, distillation, PPO, GRPO
    interop/      Hugging Face's GPT-2 in and out; GGUF for llama.cpp out and back
    tools/        the commands: python -m nanoft memory | check | export | merge | plot | reward | quantize | evaluate

train.py (the loop) and sample.py sit above all of them, at the top of the repository.
"""
import os

# torch's CPU allocator gives tensors of 2 MB or more 2 MB pages (Linux transparent huge pages) when this is set:
# a fresh activation, gradient or logits buffer then costs 512x fewer page faults on first touch, which on a
# 2-core CPU was 7% of a configs/tiny.py step at 256 wide (1,163 against 1,246 ms, one process each, set to 1 and
# to 0, side by side). torch reads it once, at its first allocation, so it is set here, before any;
# THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
