"""Exceptions that callers may want to catch by type."""

from __future__ import annotations

import torch

__all__ = [
    "NotFittedError",
    "NonFiniteError",
    "ExampleError",
    "HeadwaterWarning",
    "ZeroCurvatureWarning",
    "TruncationWarning",
    "check_finite",
    "all_finite",
]


class NotFittedError(RuntimeError):
    """Scores were requested before the curvature was fitted."""


class NonFiniteError(ArithmeticError):
    """A factor, model output or score contains NaN or inf."""


class ExampleError(ValueError):
    """One example of a dataset cannot be used: ``index`` is its position, ``detail`` what is wrong.

    The engine knows positions, not files: the command line maps ``index`` back to the file
    and line the example came from. ``context`` says which dataset and batch.
    """

    def __init__(self, index: int, detail: str, context: str = ""):
        self.index, self.detail, self.context = index, detail, context
        super().__init__(f"{context}example {index}{detail}")


class HeadwaterWarning(UserWarning):
    """Base class of headwater's own warnings: the command line always shows these."""


class ZeroCurvatureWarning(HeadwaterWarning):
    """A tracked layer has zero curvature on the fit data, so the paper's damping rule gives 0."""


class TruncationWarning(HeadwaterWarning):
    """An example's prompt was shortened from the left to fit ``max_length``; fields as ``ExampleError``."""

    def __init__(self, index: int, detail: str, context: str = ""):
        self.index, self.detail, self.context = index, detail, context
        super().__init__(f"{context}example {index}{detail}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, in one reduction for the common case.

    The sum is taken in float64: summed in float16 (or even float32 for bfloat16 inputs near
    their maximum) a tensor of finite values overflows to inf, which once made every float16
    fit fail with a false "outputs contain NaN or inf". NaN or inf anywhere makes the sum
    non-finite; only then is the exact per-element test run, so a huge-but-finite float64
    tensor whose sum overflows is still accepted.
    """
    if torch.isfinite(t.sum(dtype=torch.float64)):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, layer: str, what: str) -> torch.Tensor:
    """Return ``t`` unchanged, or raise NonFiniteError naming the layer and the quantity."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NonFiniteError(
            f"{what} of layer {layer!r} has {bad} non-finite value(s); the model may overflow "
            "in this dtype (try float32), or its weights or inputs contain NaN/inf"
        )
    return t
