"""Test set-up. Triton kernels run on CPU only through its interpreter, which must be switched on
before anything imports triton (torch itself does not): so it is set here, first, when CUDA is absent.

On a CUDA machine the same tests run the *compiled* kernels: a test of backend="triton" puts its inputs
on `helpers.device_for("triton")` (the GPU there, the CPU under the interpreter here) and compares results on
the CPU, against the PyTorch reference and bitsandbytes' CPU functions. Shared helpers: tests/helpers.py."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NANOFT_OFFLINE", "1")  # tests never download

from helpers import torch_threads  # after TRITON_INTERPRET: nothing it imports may load triton first


@pytest.fixture
def one_thread():
    """Many optimizer steps on tiny tensors: one intra-op thread avoids thread start-up and contention costs."""
    with torch_threads(1):
        yield
