"""The GPT: embeddings, pre-LayerNorm blocks, attention with a KV cache (gpt.py); the LM head's loss without
the full logits (chunked_loss.py); log-probabilities of chosen tokens, chunk by chunk (logprobs.py)."""
from nanoft.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache"]
