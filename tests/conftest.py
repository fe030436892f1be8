"""Test set-up. Triton kernels run on CPU only through its interpreter, which must be switched on
before anything imports triton (torch itself does not): so it is set here, first, when CUDA is absent."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def one_thread():
    """Many optimizer steps on tiny tensors: one intra-op thread avoids thread start-up and contention costs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
