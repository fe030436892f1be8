"""Checkpoints: tensors in safetensors, everything else in a small JSON, written so a crash never
corrupts the last good one.

On disk, in out_dir:
    ckpt-000500.safetensors   model weights ("model.<name>"), optimizer state tensors ("optim.<i>.<name>"),
                              RNG states ("rng.<name>")
    ckpt.json                 {"format", "tensors": "ckpt-000500.safetensors", "sha256", "step", "config",
                               "base_from", "data", "optim", "extra"}

Atomicity: each file is written to a temporary name, fsync'ed, then renamed over its final name
(rename is atomic on POSIX). The tensor file gets a new name per step and ckpt.json, written last,
is the commit record that points at it; older tensor files are deleted only after ckpt.json is
replaced. A `kill -9` at any instant therefore leaves either the old or the new pair, both loadable.
The sha256 in the JSON catches a tensor file that was damaged afterwards.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT = "nanoft-checkpoint-1"
META_NAME = "ckpt.json"
# keys that fix the architecture: base weights can't be loaded into a model that differs in these
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias")
# ...and a run can only be resumed with the same architecture, fine-tuning mode and adapters
SHAPE_KEYS = ARCH_KEYS + ("block_size", "finetune", "lora_r", "lora_targets", "lora_train_norms", "nf4_blocksize", "double_quant")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model; the message says which."""


@dataclass
class Checkpoint:
    step: int
    config: dict
    model: dict[str, Tensor]  # weights (for LoRA runs: only the adapter weights)
    base_from: str = "scratch"  # what the weights were initialised from (a LoRA adapter needs its base)
    data: dict = field(default_factory=dict)  # data loader positions
    optim: dict | None = None  # optimizer state_dict, tensors included
    rng: dict[str, Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. best val loss


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the renames themselves durable
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, the JSON-able rest)."""
    tensors, plain = {}, {}
    for idx, slots in state_dict["state"].items():
        for name, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(idx), {})[name] = value
    return tensors, {"plain_state": plain, "param_groups": state_dict["param_groups"]}


def _join_optimizer_state(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, slots in meta["plain_state"].items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def _dedupe(weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors refuses two names for one storage (the tied head and embedding): keep the first
    name, and record the others as aliases to restore on load."""
    tensors, aliases, seen = {}, {}, {}
    for k, v in weights.items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    return tensors, aliases


def save(out_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write ckpt into out_dir atomically; returns the path of ckpt.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedupe(ckpt.model)
    tensors.update({f"rng.{k}": v for k, v in ckpt.rng.items()})
    optim_meta = None
    if ckpt.optim is not None:
        optim_tensors, optim_meta = _split_optimizer_state(ckpt.optim)
        tensors.update(optim_tensors)
    tensor_path = out_dir / f"ckpt-{ckpt.step:06d}.safetensors"
    _write_atomic(tensor_path, lambda p: save_file(tensors, str(p)))
    meta = {
        "format": FORMAT, "tensors": tensor_path.name, "sha256": _sha256(tensor_path), "step": ckpt.step,
        "config": ckpt.config, "base_from": ckpt.base_from, "data": ckpt.data, "optim": optim_meta,
        "aliases": aliases, "extra": ckpt.extra,
    }
    meta_path = out_dir / META_NAME
    _write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    _fsync_dir(out_dir)
    for old in out_dir.glob("ckpt-*.safetensors"):  # safe now: ckpt.json no longer points at them
        if old.name != tensor_path.name:
            old.unlink()
    return meta_path


def exists(out_dir: str | Path) -> bool:
    return (Path(out_dir) / META_NAME).is_file()


def load(out_dir: str | Path, map_location: str = "cpu") -> Checkpoint:
    """Read and verify the checkpoint in out_dir; any damage is a CheckpointError naming the file."""
    out_dir = Path(out_dir)
    meta_path = out_dir / META_NAME
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint in {out_dir} ({META_NAME} not found)")
    for attempt in range(3):
        raw = meta_path.read_bytes()
        try:
            return _load(out_dir, raw, map_location)
        except CheckpointError:
            # a running trainer may have committed a newer checkpoint (and deleted the tensor file
            # this one points at) while we read: if ckpt.json moved on, read the new one
            if attempt == 2 or meta_path.read_bytes() == raw:
                raise


def _load(out_dir: Path, raw: bytes, map_location: str) -> Checkpoint:
    meta_path = out_dir / META_NAME
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a {FORMAT} file")
    tensor_path = out_dir / meta["tensors"]
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint tensors {tensor_path} are missing")
    if _sha256(tensor_path) != meta["sha256"]:
        raise CheckpointError(f"corrupt checkpoint: {tensor_path} does not match the sha256 in {meta_path}")
    try:
        tensors = load_file(str(tensor_path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint tensors {tensor_path}: {e}") from None
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "rng": {}}
    for key, value in tensors.items():
        kind, name = key.split(".", 1)
        groups[kind][key if kind == "optim" else name] = value
    for alias, name in meta.get("aliases", {}).items():
        groups["model"][alias] = groups["model"][name]
    optim = _join_optimizer_state(groups["optim"], meta["optim"]) if meta["optim"] is not None else None
    return Checkpoint(step=meta["step"], config=meta["config"], model=groups["model"], base_from=meta["base_from"],
                      data=meta["data"], optim=optim, rng=groups["rng"], extra=meta["extra"])


def check_compatible(saved_config: dict, config: dict, where: str, keys: tuple[str, ...]) -> None:
    """Refuse to load weights into a model of another shape, naming the first key that differs."""
    for key in keys:
        saved, now = saved_config.get(key), config.get(key)
        if isinstance(saved, list):
            saved = tuple(saved)
        if key in saved_config and saved != now:
            raise CheckpointError(f"checkpoint {where} has {key}={saved!r} but the config has {key}={now!r}")


def load_weights(module: torch.nn.Module, weights: dict[str, Tensor], where: str) -> None:
    """Strict load: a missing or unexpected key, or a wrong shape, is an error, never a partial load."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {where} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in weights.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"checkpoint {where}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    module.load_state_dict(weights, strict=True)


def rng_state() -> dict[str, Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"].cpu())
    cuda = [state[k].cpu() for k in sorted(state) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
