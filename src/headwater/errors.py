"""Exceptions that callers may want to catch by type."""

from __future__ import annotations

import torch

__all__ = ["NotFittedError", "NonFiniteError", "check_finite"]


class NotFittedError(RuntimeError):
    """Scores were requested before the curvature was fitted."""


class NonFiniteError(ArithmeticError):
    """A factor, model output or score contains NaN or inf."""


def check_finite(t: torch.Tensor, layer: str, what: str) -> torch.Tensor:
    """Return ``t`` unchanged, or raise NonFiniteError naming the layer and the quantity."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NonFiniteError(
            f"{what} of layer {layer!r} has {bad} non-finite value(s); the model may overflow "
            "in this dtype (try float32), or its weights or inputs contain NaN/inf"
        )
    return t
