"""An adapter knows its base by content: the sha256 of the base's tensors, recorded when it is saved and
checked whenever it is applied again (resume, merge, export, sample), whatever path the base is read from."""
from __future__ import annotations

from pathlib import Path

from nanoft.run import checkpoint
from nanoft.run.checkpoint import CheckpointError


def base_identity(base_from: str) -> dict:
    """{"path": absolute path, "sha256": of the base's tensor file}: for a nanoft checkpoint, the sha256
    its ckpt.json already records; for a .safetensors file, hashed here (cached by path, size and mtime)."""
    path = Path(base_from).resolve()
    if path.is_dir():
        return {"path": str(path), "sha256": checkpoint.read_meta(path)["sha256"]}
    stat = path.stat()
    return {"path": str(path), "sha256": _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)}


_SHA_CACHE: dict = {}


def _file_sha256(path: str, size: int, mtime: int) -> str:
    key = (path, size, mtime)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = checkpoint.sha256_file(Path(path))
    return _SHA_CACHE[key]


def check_adapter_base(ckpt: checkpoint.Checkpoint, where: str, base: str | None = None) -> None:
    """Refuse to apply an adapter to a base other than the one it was trained on (same path or not)."""
    recorded = ckpt.extra.get("adapter", {}).get("base_sha256")
    if not recorded:
        return  # not an adapter, or one saved before bases were recorded
    base = base or ckpt.base_from
    try:
        got = base_identity(base)["sha256"]
    except (OSError, CheckpointError) as e:
        raise CheckpointError(f"adapter {where} needs its base {base}, which cannot be read: {e}") from None
    if got != recorded:
        raise CheckpointError(f"adapter {where} was trained on a base with sha256 {recorded[:12]}..., but {base} "
                              f"has {got[:12]}... (it changed, or is another model); refusing to apply it")
