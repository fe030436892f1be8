"""Other people's formats, at the edge: GPT-2 in Hugging Face's layout, by name or file (hf.py), llama.cpp's GGUF
files (gguf.py), and the base a run starts from, wherever it lives (pretrained.py). Nothing below this package knows
these formats."""
