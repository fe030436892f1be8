"""What a run reads: token files and their batches (tokens.py, batches.py), SFT prompt/response data (sft.py, the
embedded speaker task), preference pairs (preferences.py), preparing corpora (corpus.py, shakespeare.py), GPT-2's
tokenizer (tokenizer.py) and checked downloads (download.py)."""
