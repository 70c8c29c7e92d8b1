"""Curvature strategies as objects that say what they need, instead of string checks in many places.

A strategy's fit is a sequence of passes over the fit data (see ``Attributor.fit``):

- identity: nothing to fit (scores are gradient dot products);
- diagonal: one pass of ``DiagonalAccumulator``;
- kfac: one covariance pass, then eigendecompositions;
- ekfac: kfac, then one eigenvalue-correction pass in the K-FAC eigenbasis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .operators import DiagonalCurvature, EigenCurvature, IdentityCurvature, LayerCurvature

__all__ = ["Strategy", "STRATEGIES", "get_strategy", "curvature_from_tensors"]


@dataclass(frozen=True)
class Strategy:
    name: str
    requires_fit: bool
    diagonal: bool = False  # one DiagonalAccumulator pass
    covariance: bool = False  # a covariance pass and eigendecompositions (K-FAC's basis)
    eigenvalue_correction: bool = False  # EK-FAC's Lambda pass on top of K-FAC

    def saved_fields(self) -> tuple[str, ...]:
        """The per-layer tensors of this strategy's factors file."""
        if self.diagonal:
            return ("diag",)
        return ("q_a", "q_s", "lam") if self.covariance else ()


STRATEGIES = {
    "identity": Strategy("identity", requires_fit=False),
    "diagonal": Strategy("diagonal", requires_fit=True, diagonal=True),
    "kfac": Strategy("kfac", requires_fit=True, covariance=True),
    "ekfac": Strategy("ekfac", requires_fit=True, covariance=True, eigenvalue_correction=True),
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {tuple(STRATEGIES)}")
    return STRATEGIES[name]


def curvature_from_tensors(
    strategy: Strategy, shapes: dict[str, tuple[int, int]], tensors: dict[str, torch.Tensor], source: str = "factors"
) -> dict[str, LayerCurvature]:
    """Operators from a factors file's tensors ``{layer}::{field}``; a missing entry names the layer."""
    out: dict[str, LayerCurvature] = {}
    for name, shape in shapes.items():
        try:
            if not strategy.requires_fit:
                out[name] = IdentityCurvature(shape)
            elif strategy.diagonal:
                out[name] = DiagonalCurvature(tensors[f"{name}::diag"])
            else:
                out[name] = EigenCurvature(tensors[f"{name}::q_a"], tensors[f"{name}::q_s"], tensors[f"{name}::lam"])
        except KeyError as e:
            raise ValueError(f"{source} has no entry {e} for layer {name!r}; the workdir is damaged, refit") from e
    return out
