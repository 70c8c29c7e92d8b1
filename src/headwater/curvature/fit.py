"""The fit, pass by pass: what ``Attributor.fit`` runs for each strategy.

    diagonal:  one pass of DiagonalAccumulator
    kfac:      covariance pass -> eigendecompositions (layer i on rank i % world)
    ekfac:     kfac, then the eigenvalue-correction pass in its eigenbasis

Each pass is one ``an.run`` (the engine's loop) with an accumulator; with a workdir, every pass
checkpoints and the covariance sums are saved after their pass, so a crash resumes where it
stopped.
"""

from __future__ import annotations

from typing import Any

from ..engine import Consumer
from .accumulators import CovarianceAccumulator, DiagonalAccumulator, LambdaAccumulator
from .operators import LayerCurvature
from .strategies import Strategy

__all__ = ["fit_curvature"]


def _fit_pass(an: Any, acc: Consumer, data: Any, batch_size: int, phase: str, spec: dict, overwrite: bool) -> None:
    every = an.settings.checkpoint_every
    ckpt = an.workdir.fit_checkpoint(phase, spec, every, overwrite) if an.workdir is not None else None
    an.run(data, acc, an.fit_losses, phase, batch_size, checkpoint=ckpt)
    if ckpt is not None:
        ckpt.clear()


def fit_curvature(
    an: Any, strategy: Strategy, data: Any, batch_size: int, spec: dict, overwrite: bool
) -> dict[str, LayerCurvature]:
    """The fitted operators of ``strategy`` for Attributor ``an`` over ``data``."""
    if strategy.diagonal:
        acc = DiagonalAccumulator(an.shapes, an.device)
        _fit_pass(an, acc, data, batch_size, "diagonal", spec, overwrite)
        return acc.diagonal()
    cov = CovarianceAccumulator(an.shapes, an.device)
    saved = an.workdir.load_covariance(spec) if an.workdir is not None and not overwrite else None
    if saved is not None:
        cov.load_state(saved)
    else:
        _fit_pass(an, cov, data, batch_size, "covariance", spec, overwrite)
        if an.workdir is not None:  # a crash from here on resumes after the covariance pass
            an.workdir.save_covariance(cov.state(), spec)
    curvature = cov.kfac(an.progress)
    del cov, saved  # the raw sums are not needed past their eigendecompositions (hundreds of MB for GPT-2)
    if strategy.eigenvalue_correction:
        lam = LambdaAccumulator(curvature, an.device)
        _fit_pass(an, lam, data, batch_size, "eigenvalue correction", spec, overwrite)
        curvature = lam.ekfac()
    return curvature
