"""The machinery around the loop: checkpoints (checkpoint.py), one run per out_dir (out_dir.py), resuming
(resume.py), skipping non-finite steps (step_guard.py), stopping between steps (stop.py), torchrun's DDP and
FSDP2 (distributed.py), device, dtype and compile choice (precision.py), progress, MFU, measured memory and the
loss plot."""
