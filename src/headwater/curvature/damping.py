"""Damping: the paper's rule per layer, and what keeps it positive where the curvature is zero."""

from __future__ import annotations

import warnings

from ..errors import ZeroCurvatureWarning
from ..validation import check_number
from .operators import LayerCurvature

__all__ = ["resolve_damping", "warn_zero_curvature"]


def _zero_layers(curvature: dict[str, LayerCurvature]) -> list[str]:
    """Layers whose paper damping is 0: every eigenvalue is 0 (identity layers excluded)."""
    return [n for n, op in curvature.items() if op.kind != "identity" and not op.default_damping() > 0]


def resolve_damping(curvature: dict[str, LayerCurvature], damping: float | None) -> dict[str, float]:
    """Per-layer damping: None -> the paper's ``0.1 x mean eigenvalue``, else the absolute value.

    A layer with zero curvature (its pseudo-gradients were all 0 on the fit data: a model that
    is certain of its outputs there, or a fresh LoRA adapter with B = 0 upstream) would get
    damping 0 and divide by zero. It gets the smallest damping of the other layers instead, or
    1.0 when every layer is flat: its gradients then enter as plain dot products over that
    damping, and ``fit`` has already warned about it. An explicit ``damping=0`` with a zero
    eigenvalue is refused for the same reason.
    """
    damping = check_number(damping, "damping", allow_none=True, hint="pass None for the paper's rule")
    if damping is None:
        out = {n: op.default_damping() for n, op in curvature.items()}
        zero = _zero_layers(curvature)
        if zero:
            positive = [out[n] for n in out if n not in zero and out[n] > 0]
            floor = min(positive) if positive else 1.0
            out.update({n: floor for n in zero})
        return out
    if damping == 0:
        for n, op in curvature.items():
            if op.kind != "identity" and bool((op.eigenvalues() <= 0).any()):
                raise ValueError(
                    f"damping=0 divides by zero: layer {n!r} has zero eigenvalues in its fitted curvature; "
                    "pass a positive damping, or None for the paper's 0.1 x mean eigenvalue"
                )
    return {n: damping for n in curvature}


def warn_zero_curvature(curvature: dict[str, LayerCurvature]) -> None:
    """Say at fit time that a layer's curvature is zero, and what its damping falls back to."""
    zero = _zero_layers(curvature)
    if not zero:
        return
    floor = resolve_damping(curvature, None)[zero[0]]
    shown = ", ".join(repr(n) for n in zero[:4]) + (f" and {len(zero) - 4} more" if len(zero) > 4 else "")
    warnings.warn(
        f"{len(zero)} of {len(curvature)} layers have zero curvature on the fit data ({shown}): every "
        "pseudo-gradient there is 0, because the model is certain of its outputs on that data or nothing "
        "the layer outputs changes the loss (e.g. a fresh LoRA adapter with B = 0, or an expert no token was "
        "routed to). The paper's damping "
        f"would be 0; these layers use damping {floor:.3g} instead "
        + ("(the smallest other layer's)" if floor != 1.0 or len(zero) < len(curvature) else "(every layer is flat)"),
        ZeroCurvatureWarning,
        stacklevel=3,
    )
