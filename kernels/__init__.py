"""Triton kernels, each beside its plain-PyTorch reference. Installed and imported as `nanoft.kernels`."""
