"""Artifacts on disk: safetensors for tensors, JSON for metadata, atomic writes, checksums, fingerprints.

Nothing here unpickles. Every write goes to a temporary file in the same directory (named
``.NAME.HOST-PID.RANDOM.part``) and is renamed into place, so an interrupted job leaves either
the old file or the new one, never a half-written one; ``clean_leftovers`` removes the
temporary files of writers that died (a SIGKILL between write and rename).

Integrity. Every safetensors file and JSON object headwater writes carries a checksum of its
content (xxh3-128: 0.13 s per GiB on one core here, against 1.1 s for sha256), recorded at
write time inside the file itself (the safetensors header; a ``"checksum"`` key in JSON), so it
travels with the file and needs no shared manifest that ranks would race on. Reads verify it
while the content is in memory anyway (tensors are hashed as loaded, not read twice). A
mismatch raises ``CorruptArtifactError``: one line naming the file and what to do. The
checksum detects damage (flipped bits, truncation, a stray edit), not a deliberate forgery:
whoever can rewrite the file can rewrite its checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "SCHEMA_VERSION",
    "CHECKSUM",
    "CorruptArtifactError",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_json",
    "load_json",
    "save_tensors",
    "load_tensors",
    "tensors_meta",
    "tensors_checksum",
    "json_checksum",
    "clean_leftovers",
    "model_fingerprint",
]

SCHEMA_VERSION = 2  # 2: every artifact carries a checksum
CHECKSUM = "xxh3-128"
# One metadata entry holding {"meta": <metadata JSON>, "checksum": ...}: safetensors writes its
# metadata map in hash order, so two entries would make the file's bytes differ run to run.
_META_KEY = "headwater"
_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"


class CorruptArtifactError(ValueError):
    """A file headwater wrote does not match its checksum, is truncated, or is not headwater's."""


def _hasher() -> Any:
    import xxhash

    return xxhash.xxh3_128()


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{_HOST}-{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".part")
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


def _alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negatives signal process groups, never one writer
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such PID at all)
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_leftovers(directory: str | Path) -> list[Path]:
    """Remove temporary files left by writers on this host that are no longer running.

    A temporary file's name records its writer's host and PID, so a live writer's file (another
    rank, a concurrent command) is never touched, and nor is one from another host on a shared
    file system. Returns what was removed.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.rglob(".*.part"):
        parts = path.name.rsplit(".", 3)  # [".NAME", "HOST-PID", "RANDOM", "part"]
        if len(parts) != 4 or "-" not in parts[1]:
            continue
        host, _, pid = parts[1].rpartition("-")
        if host == _HOST and pid.isdigit() and not _alive(int(pid)):
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only share: leave it, it harms nothing
                continue
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------


def json_checksum(obj: Any) -> str:
    """Checksum of a JSON value in canonical form (sorted keys, no spaces), ``checksum`` key excluded."""
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != "checksum"}
    h = _hasher()
    h.update(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    return f"{CHECKSUM}:{h.hexdigest()}"


def save_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` (a dict gets a ``checksum`` key). NaN and inf are refused: not JSON."""
    if isinstance(obj, dict):
        obj = {**obj, "checksum": json_checksum(obj)}
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def load_json(path: str | Path, hint: str = "rerun the command that wrote it", require_checksum: bool = True) -> Any:
    """Read a JSON object headwater wrote and verify its checksum.

    A missing checksum is refused too (``require_checksum``): a flipped byte in the key's name
    must not turn verification off.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as e:
        line = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CorruptArtifactError(f"{path} is not valid JSON{line}: the file is damaged; {hint}") from e
    if require_checksum and not (isinstance(obj, dict) and "checksum" in obj):
        raise CorruptArtifactError(
            f"{path} has no checksum, so it cannot be verified (it was not written by this version of "
            f"headwater); {hint}"
        )
    if isinstance(obj, dict) and "checksum" in obj:
        try:
            ok = obj["checksum"] == json_checksum(obj)
        except ValueError:
            ok = False
        if not ok:
            raise CorruptArtifactError(
                f"{path} does not match its checksum: it was changed after headwater wrote it; {hint}"
            )
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# ---------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------


def tensors_checksum(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """Checksum of a tensor dict (names, dtypes, shapes, bytes, in sorted order) and its metadata."""
    h = _hasher()
    h.update(meta_json.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return f"{CHECKSUM}:{h.hexdigest()}"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> str:
    """Atomically save tensors (contiguous, on CPU) with JSON metadata and a checksum in the header.

    Returns the checksum, which callers use as the content's identity (cache keys).
    """
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(meta or {}, sort_keys=True, allow_nan=False)
    checksum = tensors_checksum(clean, meta_json)
    header = {_META_KEY: json.dumps({"checksum": checksum, "meta": meta_json}, sort_keys=True)}
    _atomic(Path(path), lambda tmp: save_file(clean, tmp, metadata=header))
    return checksum


def _header(path: Path, hint: str) -> tuple[str, str | None]:
    """(metadata JSON, recorded checksum or None) from a safetensors file's header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY, "{}")
    except Exception as e:  # safetensors raises its own error types
        raise CorruptArtifactError(
            f"{path} is not a readable safetensors file ({_first(e)}): it is damaged; {hint}"
        ) from e
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} has a damaged header: {hint}") from e
    if isinstance(entry, dict) and set(entry) == {"checksum", "meta"} and isinstance(entry["meta"], str):
        return entry["meta"], entry["checksum"]
    return raw, None  # not written by this version: no checksum


def tensors_meta(path: str | Path, hint: str = "rerun the stage that wrote it") -> tuple[dict, str | None]:
    """(metadata, checksum) from a safetensors header, without reading the tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    meta_json, checksum = _header(path, hint)
    try:
        return json.loads(meta_json), checksum
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} has a damaged header: {hint}") from e


def load_tensors(
    path: str | Path, artifact: str | None = None, hint: str = "rerun the stage that wrote it"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify a safetensors file headwater wrote: (tensors, metadata).

    ``artifact`` names the file's role in messages ("factors", "cached scores", ...), ``hint``
    says what to do about damage (e.g. "refit with --overwrite").
    """
    from safetensors.torch import load_file

    path = Path(path)
    what = f"{path} ({artifact})" if artifact else str(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} does not exist")
    meta_json, recorded = _header(path, hint)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CorruptArtifactError(
            f"{what} is not a readable safetensors file ({_first(e)}): it is damaged; {hint}"
        ) from e
    if recorded is None:
        raise CorruptArtifactError(
            f"{what} has no checksum, so it cannot be verified (it was not written by this version of "
            f"headwater); {hint}"
        )
    if tensors_checksum(tensors, meta_json) != recorded:
        raise CorruptArtifactError(
            f"{what} does not match its checksum: it was changed after headwater wrote it; {hint}"
        )
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as e:  # pragma: no cover - the checksum covers the metadata
        raise CorruptArtifactError(f"{what} has a damaged header: {hint}") from e
    return tensors, meta


def _first(e: BaseException) -> str:
    return " ".join((str(e).strip() or type(e).__name__).split("\n")[0].split())


# ---------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------


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
