"""Datasets in, batches out: a list, a torch ``Dataset`` or a HF ``datasets.Dataset``.

All three support ``len`` and integer indexing, which is all headwater needs: examples are
read in dataset order, so score column j is always training example j.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .errors import ExampleError, TruncationWarning
from .task import Task

__all__ = ["check_data", "iter_batches", "fingerprint", "Subset", "sample_examples"]


def check_data(data: Any, name: str) -> Any:
    """Validate that ``data`` is an indexable, sized, non-empty collection."""
    if isinstance(data, (str, bytes)) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(
            f"{name} must be a list, a torch Dataset or a HF datasets.Dataset "
            f"(anything with len() and integer indexing), got {type(data).__name__}"
        )
    if len(data) == 0:
        raise ValueError(f"{name} is empty; give at least one example")
    return data


def iter_batches(
    data: Any, task: Task, batch_size: int, name: str, batches: list[int] | None = None
) -> Iterator[tuple[int, Any]]:
    """Yield ``(index of the first example, collated batch)`` in dataset order.

    ``batches`` restricts the pass to those batch numbers (batch b starts at b * batch_size),
    which is how ranks split the work and resumed runs skip what is done.
    """
    n = len(data)
    for b in range(0, (n + batch_size - 1) // batch_size) if batches is None else batches:
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        items = [data[i] for i in range(lo, hi)]
        context = f"{name}, examples {lo}..{hi - 1}: "
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                batch = task.collate(items)
            except ExampleError as e:  # the task counts within the batch; say where in the dataset
                raise ExampleError(lo + e.index, e.detail, context) from e
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{context}{e}") from e
        for w in caught:
            if isinstance(w.message, TruncationWarning):
                warnings.warn(TruncationWarning(lo + w.message.index, w.message.detail, f"{name}: "), stacklevel=2)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        yield lo, batch


def _hash_item(h: Any, item: Any) -> None:
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    elif isinstance(item, Mapping):
        for k in sorted(item, key=str):
            h.update(str(k).encode())
            _hash_item(h, item[k])
    elif isinstance(item, (list, tuple)):
        h.update(b"[")
        for v in item:
            _hash_item(h, v)
        h.update(b"]")
    else:
        try:
            h.update(json.dumps(item, sort_keys=True, default=str).encode())
        except TypeError:  # pragma: no cover - exotic objects
            h.update(repr(item).encode())


def fingerprint(data: Any) -> str:
    """A content hash of every example, so a workdir can tell whether data changed.

    Hashing raw examples costs far less than one forward pass over them.
    """
    h = hashlib.sha256()
    h.update(str(len(data)).encode())
    for i in range(len(data)):
        _hash_item(h, data[i])
    return h.hexdigest()[:16]


class Subset:
    """``data`` restricted to ``indices`` (in that order): sized and indexable, as the engine needs."""

    def __init__(self, data: Any, indices: Any):
        self.data, self.indices = data, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.data[self.indices[i]]


def sample_examples(data: Any, n: int | None, seed: int) -> Any:
    """A seeded random subset of ``n`` examples in dataset order (all of ``data`` when n is None or >= len)."""
    if n is None or n >= len(data):
        return data
    g = torch.Generator().manual_seed(seed)
    return Subset(data, sorted(torch.randperm(len(data), generator=g)[:n].tolist()))
