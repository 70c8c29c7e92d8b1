"""Curvature: per-layer Gauss-Newton estimates as operators, the accumulators that fit them,
the strategies that say which passes a fit needs, damping, and the one eigendecomposition helper.

Each strategy is a block-diagonal (per tracked layer) approximation of the per-sequence
Gauss-Newton matrix ``G = E_m[vec(dW_m) vec(dW_m)^T]``, where ``dW_m = sum_t g_t a_t^T`` is the
pseudo-gradient of sequence m in canonical layout [O, I].
"""

from .accumulators import (
    Accumulator,
    CovarianceAccumulator,
    DenseAccumulator,
    DiagonalAccumulator,
    LambdaAccumulator,
    Projected,
)
from .damping import resolve_damping, warn_zero_curvature
from .fit import fit_curvature
from .linalg import lapack_threads, symmetric_eigh
from .operators import (
    DAMPING_SCALE,
    INVERSE,
    DenseEigenCurvature,
    DiagonalCurvature,
    EigenCurvature,
    IdentityCurvature,
    Inverse,
    LayerCurvature,
    rotated_grads,
)
from .strategies import STRATEGIES, Strategy, curvature_from_tensors, get_strategy

__all__ = [
    "DAMPING_SCALE",
    "INVERSE",
    "Accumulator",
    "CovarianceAccumulator",
    "DenseAccumulator",
    "DiagonalAccumulator",
    "LambdaAccumulator",
    "Projected",
    "fit_curvature",
    "resolve_damping",
    "warn_zero_curvature",
    "lapack_threads",
    "symmetric_eigh",
    "DenseEigenCurvature",
    "DiagonalCurvature",
    "EigenCurvature",
    "IdentityCurvature",
    "Inverse",
    "LayerCurvature",
    "rotated_grads",
    "STRATEGIES",
    "Strategy",
    "curvature_from_tensors",
    "get_strategy",
]
