"""nanoft: a from-scratch GPT pretraining and fine-tuning framework, written to be read."""
