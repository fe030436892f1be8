"""Checkpoints: tensors in safetensors, everything else in a small JSON, written so a crash never
corrupts the last good one.

On disk, in out_dir:
    ckpt-000500-<sha>.safetensors   model weights ("model.<name>"), optimizer state tensors
                                    ("optim.<i>.<name>"), RNG states ("rng.<name>"; several ranks:
                                    "rng.rank<r>.<name>", each rank's own)
    ckpt.json                       {"format", "tensors": "ckpt-000500-<sha>.safetensors", "sha256", "step",
                                     "config", "base_from", "data", "optim", "aliases", "extra"}
    .lock                           held by the run that owns out_dir (nanoft.run.out_dir)

Atomicity: each file is written to a temporary name of its own process (`<name>.<pid>.tmp`, so two
writers never share one), fsync'ed, then renamed over its final name (rename is atomic on POSIX). The
tensor file's name carries the step and the start of its sha256, so a save never replaces the file the
committed ckpt.json points at (not even a second save of the same step); ckpt.json, written last, is the
commit record; older tensor files are deleted only after it is replaced. A `kill -9` at any instant
therefore leaves either the old or the new pair, both loadable; a failed write (a full disk) removes what
it wrote and keeps the old pair. The sha256 in the JSON catches a tensor file damaged afterwards.

A checkpoint with a NaN or inf in its weights or optimizer state is refused: a diverged run never
replaces the last good checkpoint. out_dir/best/ (train.py) is a second checkpoint of the same format:
the weights with the lowest validation loss.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT = "nanoft-checkpoint-1"
META_NAME = "ckpt.json"
META_KEYS = ("tensors", "sha256", "step", "config", "base_from", "data", "optim", "extra")
BEST_DIR = "best"  # out_dir/best: the checkpoint with the lowest validation loss
# keys that fix the architecture: base weights can't be loaded into a model that differs in these
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias", "tie_embeddings")
# ...and a run can only be resumed with the same architecture, fine-tuning mode and adapters
SHAPE_KEYS = ARCH_KEYS + ("block_size", "finetune", "finetune_weights", "lora_r", "lora_targets", "lora_train_norms", "nf4_blocksize", "double_quant",
                          "prefix_len", "prefix_hidden", "adapter_size")


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
    train_only: dict[str, Tensor] = field(default_factory=dict)  # what only resuming needs (prefix tuning's MLP)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_tmp(path: Path, write) -> Path:
    """Write through `write(tmp)` and fsync; a failure (ENOSPC, EFBIG...) removes the partial file."""
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before a name points at them
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _remove_stale_tmp(out_dir: Path) -> None:
    """Temporary files of processes that no longer exist (killed mid-save) are garbage."""
    for tmp in out_dir.glob("*.tmp"):
        pid = tmp.suffixes[-2][1:] if len(tmp.suffixes) >= 2 else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the renames themselves durable
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
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


def _first_non_finite(tensors: dict[str, Tensor]) -> str | None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def save(out_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write ckpt into out_dir atomically; returns the path of ckpt.json. Refuses non-finite tensors, and
    turns a failed write into a CheckpointError after removing what it wrote (the old checkpoint stays)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedupe(ckpt.model)
    tensors.update({f"rng.{k}": v for k, v in ckpt.rng.items()})
    tensors.update({f"train.{k}": v.detach().cpu().contiguous() for k, v in ckpt.train_only.items()})
    optim_meta = None
    if ckpt.optim is not None:
        optim_tensors, optim_meta = _split_optimizer_state(ckpt.optim)
        tensors.update(optim_tensors)
    bad = _first_non_finite(tensors)
    if bad:
        raise CheckpointError(f"refusing to save step {ckpt.step} in {out_dir}: {bad} holds NaN or inf "
                              "(the run diverged); the previous checkpoint is kept")
    _remove_stale_tmp(out_dir)
    tensor_path = meta_path = None
    try:
        tmp = _write_tmp(out_dir / f"ckpt-{ckpt.step:06d}.safetensors", lambda p: save_file(tensors, str(p)))
        sha = sha256_file(tmp)
        # the name holds the content's hash: never the name of the committed file unless the bytes are equal
        tensor_path = out_dir / f"ckpt-{ckpt.step:06d}-{sha[:12]}.safetensors"
        os.replace(tmp, tensor_path)
        meta = {
            "format": FORMAT, "tensors": tensor_path.name, "sha256": sha, "step": ckpt.step,
            "config": ckpt.config, "base_from": ckpt.base_from, "data": ckpt.data, "optim": optim_meta,
            "aliases": aliases, "extra": ckpt.extra,
        }
        text = json.dumps(meta, indent=1, allow_nan=False)  # strict JSON: no bare NaN for other readers
        meta_path = out_dir / META_NAME
        os.replace(_write_tmp(meta_path, lambda p: p.write_text(text)), meta_path)
    except (OSError, ValueError, SafetensorError) as e:
        if tensor_path is not None and _committed_tensors(out_dir) != tensor_path.name:
            tensor_path.unlink(missing_ok=True)  # an orphan: the committed ckpt.json does not point at it
        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"could not write the step {ckpt.step} checkpoint in {out_dir}: {what}; "
                              f"the previous checkpoint is kept") from None
    _fsync_dir(out_dir)  # make the renames themselves durable
    for old in out_dir.glob("ckpt-*.safetensors"):  # safe now: ckpt.json no longer points at them
        if old.name != tensor_path.name:
            old.unlink()
    return meta_path


def _committed_tensors(out_dir: Path) -> str | None:
    try:
        return read_meta(out_dir)["tensors"]
    except CheckpointError:
        return None


def read_meta(out_dir: str | Path) -> dict:
    """ckpt.json alone (no tensors read), checked to have every key a checkpoint needs."""
    meta_path = Path(out_dir) / META_NAME
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint in {out_dir} ({META_NAME} not found)")
    return _parse_meta(meta_path, meta_path.read_bytes())


def _parse_meta(meta_path: Path, raw: bytes) -> dict:
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a {FORMAT} file")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: no {missing[0]!r} key")
    if not isinstance(meta["config"], dict) or not isinstance(meta["step"], int):
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: 'config' or 'step' has the wrong type")
    return meta


def best_val_loss(out_dir: str | Path) -> float:
    """The validation loss of out_dir/best (train.py keeps the best weights there), inf if none."""
    try:
        return float(read_meta(Path(out_dir) / BEST_DIR)["extra"].get("val_loss", math.inf))
    except CheckpointError:
        return math.inf


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
    meta = _parse_meta(meta_path, raw)
    tensor_path = out_dir / meta["tensors"]
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint tensors {tensor_path} are missing")
    if sha256_file(tensor_path) != meta["sha256"]:
        raise CheckpointError(f"corrupt checkpoint: {tensor_path} does not match the sha256 in {meta_path}")
    try:
        tensors = load_file(str(tensor_path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint tensors {tensor_path}: {e}") from None
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "rng": {}, "train": {}}
    for key, value in tensors.items():
        kind, name = key.split(".", 1)
        groups[kind][key if kind == "optim" else name] = value
    for alias, name in meta.get("aliases", {}).items():
        groups["model"][alias] = groups["model"][name]
    optim = _join_optimizer_state(groups["optim"], meta["optim"]) if meta["optim"] is not None else None
    return Checkpoint(step=meta["step"], config=meta["config"], model=groups["model"], base_from=meta["base_from"],
                      data=meta["data"], optim=optim, rng=groups["rng"], extra=meta["extra"], train_only=groups["train"])


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


# --- RNG: what dropout draws from ---------------------------------------------------------------------
# A single process saves "torch_cpu" and "torch_cuda_<i>" (every device's generator). Several ranks each draw
# their own dropout masks (distributed.seed_ranks), so each saves its own under its rank's name:
# "rank<r>.torch_cpu" and "rank<r>.torch_cuda", its own device's only (the others are other ranks' devices,
# never advanced in this process).

def rng_state() -> dict[str, Tensor]:
    """A single process's generators: the CPU's and every CUDA device's."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def own_rng_state(device: str) -> dict[str, Tensor]:
    """One rank's generators: the CPU's and its own device's (CPU tensors, so they pickle to rank 0)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def per_rank(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Every rank's own_rng_state (in rank order) under its rank's names, for Checkpoint.rng."""
    return {f"rank{r}.{name}": v for r, state in enumerate(states) for name, v in state.items()}


def _by_rank(state: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """A checkpoint's RNG states, one dict per process that saved them (a single process's: one)."""
    ranks: dict[int, dict] = {}
    for key, v in state.items():
        if key.startswith("rank"):
            r, name = key.removeprefix("rank").split(".", 1)
            ranks.setdefault(int(r), {})[name] = v
    return [ranks[r] for r in sorted(ranks)] if ranks else [state]


def set_rng_state(state: dict[str, Tensor]) -> None:
    """Restore a single process's generators (rng_state), every device's."""
    torch.set_rng_state(state["torch_cpu"].cpu())
    # by device number: sorted as strings, torch_cuda_10 would come before torch_cuda_2
    names = sorted((k for k in state if k.startswith("torch_cuda_")), key=lambda k: int(k.removeprefix("torch_cuda_")))
    cuda = [state[k].cpu() for k in names]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def set_own_rng_state(state: dict[str, Tensor], rank: int, world_size: int, device: str) -> int:
    """Continue this process's generators from a checkpoint's; returns how many processes saved them.

    The same count as now: rank r takes saved rank r's (a single process: all of its devices'), and dropout
    goes on bit-exactly. Another count: rank r takes saved rank r's if there was one (a single process's
    counts as rank 0, its CUDA state the one of this rank's device number); a rank beyond them keeps what
    it has (distributed.seed_ranks seeded it apart from the others)."""
    saved = _by_rank(state)
    if world_size == 1 and "torch_cpu" in state:
        set_rng_state(state)
    elif rank < len(saved):
        own = saved[rank]
        torch.set_rng_state(own["torch_cpu"].cpu())
        if device.startswith("cuda"):
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            cuda = own.get("torch_cuda", own.get(f"torch_cuda_{index}"))
            if cuda is not None:
                torch.cuda.set_rng_state(cuda.cpu(), device)  # this device's only: no context on the others
    return len(saved)
