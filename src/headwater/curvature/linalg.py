"""Placeholder: replaced by the measured eigh helper (see benchmarks/eigh.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["lapack_threads", "symmetric_eigh"]


@contextlib.contextmanager
def lapack_threads(t: torch.Tensor, threads: int = 1) -> Iterator[None]:
    """Run CPU LAPACK calls (eigh) on one thread (OpenBLAS's threaded eigh spins on shared cores)."""
    if t.device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending, eigenvectors) of a symmetric float64 matrix."""
    with lapack_threads(matrix):
        return torch.linalg.eigh(matrix)
