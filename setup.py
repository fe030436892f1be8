"""Install nanoft and its Triton kernels.

The top-level `kernels/` folder is installed as `nanoft.kernels` (not as a top-level `kernels`
package): Hugging Face's kernel hub, which bitsandbytes imports, is also called `kernels`, and a
`pip install` of nanoft must never overwrite or shadow it.
"""
from setuptools import find_packages, setup

setup(
    name="nanoft",
    version="0.1.0",
    description="A from-scratch GPT pretraining and fine-tuning framework to read, run and modify",
    python_requires=">=3.10",
    packages=[*find_packages(include=["nanoft", "nanoft.*"]), "nanoft.kernels"],
    package_dir={"nanoft.kernels": "kernels"},
    install_requires=[
        # a range, not a pin: where torch is already installed (CPU or CUDA build) it is kept
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "tiktoken>=0.7",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "wandb>=0.17",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "bitsandbytes==0.50.2", "matplotlib>=3.6",
                 "transformers==5.17.*", "peft==0.21.*",  # references for tests/interop/test_hf.py; nanoft never imports them
                 "gguf==0.19.*",  # tests/interop/test_gguf.py: its quantizer and reader, transformers' GGUF loading
                 "ruff==0.17.6"],  # the linter CI runs (ruff.toml)
        "plot": ["matplotlib>=3.6"],  # python -m nanoft plot, and out_dir/loss.png at each evaluation
        "gguf": ["gguf==0.19.*"],  # python -m nanoft export RUN --to model.gguf: llama.cpp's own file writer
    },
)
