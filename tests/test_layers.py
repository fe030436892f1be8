"""The package's shape, enforced: imports run one way, from the commands down to the config, and never in a circle.

Layers, bottom to top (a module may import its own layer and those below, never one above):

    config, kernels      the typed Config; Triton kernels and their CPU paths
    data                 token files, SFT and preference data, the tokenizer, preparing corpora
    quant, optim         NF4 weights; optimizers and the lr schedule
    model                the GPT and its losses
    run                  checkpoints, out_dir lock, resume, step guard, stop requests, distributed, precision
    peft                 LoRA, QLoRA, prefix tuning, adapter layers
    objectives           next-token, DPO, reward model, distillation; the method table
    interop              Hugging Face in and out
    tools, train.py, sample.py   the commands: nothing imports them
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("structure", ROOT / "bench" / "structure.py")
structure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(structure)

LAYERS = [("nanoft.config", "nanoft.kernels"), ("nanoft.data",), ("nanoft.quant", "nanoft.optim"), ("nanoft.model",),
          ("nanoft.run",), ("nanoft.peft",), ("nanoft.objectives",), ("nanoft.interop",),
          ("nanoft.tools", "nanoft.__main__", "train.py", "sample.py")]


def layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def test_no_module_imports_a_layer_above_its_own():
    graph = structure.import_graph()
    upward = [f"{a} -> {b}" for a, targets in graph.items() if a != "nanoft" for b in targets
              if b != "nanoft" and layer(b) > layer(a)]
    assert upward == []


def test_no_import_cycles_lazy_imports_included():
    assert structure.cycles(structure.import_graph()) == []


def test_the_gpt_loads_no_checkpoint_distributed_download_or_hugging_face_code():
    code = "import sys, nanoft.model; print(' '.join(sorted(m for m in sys.modules if m.startswith('nanoft'))))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout.split())
    kernels = {"nanoft.kernels", "nanoft.kernels._cc", "nanoft.kernels._triton",
               "nanoft.kernels.blockwise8", "nanoft.kernels.nf4", "nanoft.kernels.nf4_cpu",
               "nanoft.kernels.cross_entropy_cpu"}  # the bottom layer: the loss's CPU kernel and the package's others
    assert loaded == {"nanoft", "nanoft.config", "nanoft.model", "nanoft.model.gpt", "nanoft.model.chunked_loss",
                      *kernels}


def test_nothing_imports_a_command():
    graph = structure.import_graph()
    importers = {a: b for a, targets in graph.items() for b in targets if b.startswith("nanoft.tools")
                 and not a.startswith("nanoft.tools")}
    assert importers == {}
