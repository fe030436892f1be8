"""Parameter-efficient fine-tuning: the frozen base plus a few trained tensors. LoRA's layer (lora.py) and its
surgery, adapter files and merge (lora_model.py); prefix tuning (prefix.py); Houlsby adapter layers (houlsby.py);
the table of methods and the protocol they share (methods.py)."""
