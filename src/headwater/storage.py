"""Artifacts on disk: safetensors for tensors, JSON for metadata, atomic writes, fingerprints.

Nothing here unpickles. Every write goes to a temporary file in the same directory and is
renamed into place, so an interrupted job leaves either the old file or the new one, never a
half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "SCHEMA_VERSION",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_json",
    "load_json",
    "save_tensors",
    "load_tensors",
    "model_fingerprint",
]

SCHEMA_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _atomic(Path(path), write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}; the file is damaged") from e


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Atomically save tensors (contiguous, on CPU) with optional JSON metadata in the header."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"headwater": json.dumps(meta or {}, sort_keys=True)}
    _atomic(Path(path), lambda tmp: save_file(clean, tmp, metadata=header))


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("headwater", "{}"))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from e
    return tensors, meta


def model_fingerprint(model: nn.Module) -> str:
    """Hash of parameter names, shapes and a strided sample of their values.

    Values are rounded to bfloat16 first, so the same weights held in fp32 or bf16 match,
    while a different checkpoint (or architecture) does not. Sampling keeps this cheap for
    billion-parameter models.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}".encode())
        p = p.detach()
        if hasattr(p, "full_tensor"):  # an FSDP2 / DTensor shard: every rank hashes the whole parameter
            p = p.full_tensor()
        flat = p.reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.bfloat16).float()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
