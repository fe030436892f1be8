"""Resuming with a changed config: print what changed, refuse what cannot change, find the same data row.

    check_resume(resume, cfg)                                   # --init_from=resume
    train_batches.load_state_dict(resumed_position(resume, cfg, world_size))
"""
from __future__ import annotations

from nanoft.run import checkpoint
from nanoft.run.adapter_base import check_adapter_base
from nanoft.run.checkpoint import CheckpointError
from nanoft.run.distributed import launched_rank

# keys a resumed run cannot change, and why; the model's shape (checkpoint.SHAPE_KEYS) cannot change either
REFUSED_ON_RESUME = {
    "optimizer": "the saved optimizer state belongs to the optimizer that wrote it",
    "min_8bit_size": "it decides which optimizer states are stored in 8 bits",
    "lora_alpha": "it scales the trained adapter, so it would change the model",
    "dataset": "the saved data position indexes the old data",
    "sft_data": "the saved data position indexes the old examples",
    "preference_data": "the saved data position indexes the old pairs",
}
# keys that may change but end bit-exactness with an uninterrupted run
GEOMETRY = ("batch_size", "grad_accum", "seed", "dropout", "lora_dropout")
NOT_COMPARED = ("init_from", "out_dir", "overwrite")  # where the run is, not what it trains


def check_resume(resume: checkpoint.Checkpoint, cfg) -> None:
    """Refuse a resume whose config changes what cannot change (one line naming the key); print what
    changes. Optimizer hyperparameters (lr, weight_decay, betas, eps) take this config's values:
    `distributed.load_optimizer_state` keeps them over the saved ones."""
    where = cfg.out_dir
    checkpoint.check_compatible(resume.config, cfg.to_dict(), where, checkpoint.SHAPE_KEYS)
    now = cfg.to_dict()
    for key, why in REFUSED_ON_RESUME.items():
        if key in resume.config and _norm(resume.config[key]) != _norm(now[key]):
            raise CheckpointError(f"checkpoint {where} was trained with {key}={resume.config[key]!r}; resuming with "
                                  f"{key}={now[key]!r} is refused ({why}); start a new run from it instead: "
                                  f"--init_from={where} --out_dir=<another dir>")
    check_adapter_base(resume, where)
    changed = [k for k in now if k in resume.config and k not in NOT_COMPARED + checkpoint.SHAPE_KEYS
               and _norm(resume.config[k]) != _norm(now[k])]
    if changed and launched_rank() == 0:
        print("resume: " + ", ".join(f"{k} {resume.config[k]!r} -> {now[k]!r}" for k in changed) + " (applied)")
        if any(k in GEOMETRY for k in changed):
            print("resume: batch geometry, seed or dropout changed: the run goes on from the same data position, "
                  "but is no longer bit-exact with an uninterrupted run")


def _norm(value):
    return tuple(value) if isinstance(value, list) else value


def resumed_position(resume: checkpoint.Checkpoint, cfg, world_size: int) -> dict:
    """The training data position for this run. Positions count global batches of batch_size * world_size
    rows; when that changed, convert so the run continues at the same row (token window or example)."""
    state = dict(resume.data["train"])
    saved_world = resume.data.get("world_size")  # None: a checkpoint that did not record it; trust its position
    if saved_world is None:
        return state
    old_rows, new_rows = resume.config["batch_size"] * saved_world, cfg.batch_size * world_size
    if old_rows == new_rows:
        return state
    rows_done = state["position"] * old_rows
    state["position"], again = divmod(rows_done, new_rows)
    if launched_rank() == 0:
        print(f"resume: global batch {old_rows} -> {new_rows} rows: continuing after row {rows_done - again:,} of "
              f"{rows_done:,} drawn" + (f" ({again} rows drawn again)" if again else ""))
    return state
