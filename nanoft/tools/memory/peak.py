"""The peak of one training step: the exact rows and the activations (nanoft.tools.memory.estimate), plus the largest
of the moments when temporaries join them, the optimizer's scratch included. Nothing is allocated.
"""
from __future__ import annotations

from nanoft.model.chunked_loss import chunk_rows_for, on_cpu_kernel
from nanoft.optim import optimizer_class
from nanoft.tools.memory.estimate import Run, activation_bytes, static_bytes, trainable_and_frozen
from nanoft.tools.memory.shape import ModelShape, ParamSpec

# --- the peak: the moment in a step when the most is alive --------------------------------------------

def scratch_bytes(trainable: list[tuple[ParamSpec, int]], run: Run) -> int:
    """Optimizer temporaries during step() (approximate), as the optimizer's table entry counts them for its
    largest tensor (or page of states)."""
    if not trainable:
        return 0
    biggest = max(p.numel for p, _ in trainable)
    return optimizer_class(run.cfg.optimizer).scratch_bytes(biggest, min(run.cfg.page_size, biggest), run.device)


def peak_bytes(shape: ModelShape, run: Run) -> dict[str, int]:
    """The whole estimate: the exact rows, the activations, and the peak over the moments of one step.

    Between steps memory holds parameters and optimizer states (gradients too while micro-batches accumulate:
    zero_grad(set_to_none) frees them after step()) and the batch; the chunked loss leaves no logits behind.
    On top of that, the peak is the largest of:
      loss forward     all activations + one chunk's logits (nanoft.model.chunked_loss): on a CPU in the compute dtype,
                       dL/dz written over them; elsewhere upcast to float32 too, the softmax made in place
      head backward    all activations + the loss's two saved gradients, scaled into new tensors
      block recompute  (checkpointing) the block inputs + one block's activations + the gradients flowing through
      end of backward  every gradient + the embedding's dense gradient, before it is added into .grad
      optimizer step   every gradient + the optimizer's temporaries
    The moments were read off allocator traces of real steps (see `python -m nanoft memory CONFIG --measure`).
    """
    st = static_bytes(shape, run)
    act = activation_bytes(shape, run)
    cfg = run.cfg
    N, V, C = cfg.batch_size * cfg.block_size, shape.vocab_size, shape.n_embd
    trainable, _ = trainable_and_frozen(shape, run)
    s = run.act_bytes
    logits = 0  # the chunked loss holds no logits between steps: at most one chunk's, during forward
    c_kernel = on_cpu_kernel(run.device, run.compute_dtype)
    rows = chunk_rows_for(N, V, run.compute_dtype, run.device) if shape.arch != "nominal" else 0
    chunk_logits = rows * V * s if c_kernel else rows * V * 4 + (rows * V * s if s < 4 else 0)
    batch = 2 * N * 8 if shape.arch != "nominal" else 0
    # on a CPU the host is the device: a paged optimizer's states are in the same memory
    base = st["params"] + st["frozen_model"] + st["states"] + (st["states_host"] if run.device == "cpu" else 0) + logits + batch
    g_prev = st["grads"] if cfg.grad_accum > 1 else 0
    head_grad = V * C * 4 if run.mode == "full" and shape.arch != "nominal" else 0
    head_elem = 4 if run.mode == "full" else run.frozen_bytes  # the head weight's dtype: autocast casts it if it differs
    fwd, head_saved = act["forward"], N * C * 4 + head_grad  # the loss's two gradients, made in its forward
    moments = {  # one chunk: its logits (+ under autocast the head's cast), and, when the head trains, the chunk's
        # share of dL/dW beside their float32 sum
        "loss forward (one chunk)": g_prev + fwd + chunk_logits
        + (V * C * s if s < 4 and head_elem != s else 0)
        + (V * C * s if head_grad else 0),  # the chunk's share of dL/dW, in the compute dtype
        "head backward": g_prev + fwd + head_saved,  # the saved gradients, scaled by dL/dloss into new tensors
        "end of backward": st["grads"] + head_grad,  # the embedding's dense gradient, before it is added in
        "optimizer step": st["grads"] + scratch_bytes(trainable, run),
    }
    if act["recompute"]:  # checkpointing: one block's activations come back, with the gradients flowing through
        # it, at their widest the MLP's two (N, 4C) float32 ones (of fc_in's output and of GELU's input)
        moments["block recompute"] = g_prev + head_grad + fwd - head_saved + act["recompute"] + 2 * N * shape.ffn * 4
    if shape.arch == "nominal":  # no dimensions: only the per-parameter rows
        moments = {"no dimensions (parameters + gradients + states only)": st["grads"]}
    worst = max(moments, key=moments.get)
    total = base + moments[worst]
    return {**st, "activations": act["peak"], "act_forward": act["forward"], "act_recompute": act["recompute"],
            "logits": logits, "transient": total - (base - logits - batch) - st["grads"] - act["peak"],
            "total": total, "peak_moment": worst, "rule_16_bytes": 16 * st["n_params"]}


def rule_16_bytes(n_params: int) -> int:
    """The 16 bytes/parameter rule's full fine-tune estimate without activations: 4 (weights) + 4 (grads) + 8 (Adam) bytes/param."""
    return 16 * n_params
