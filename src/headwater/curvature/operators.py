"""Curvature operators: per-layer estimates of the Gauss-Newton matrix G that scoring applies.

Each is a symmetric PSD operator on [..., O, I] tensors (row-major vec order, so
``vec(S V A) = (S kron A^T) vec(V)``) held as an eigendecomposition, and every use of it is a
*spectral function* of its eigenvalues: ``solve(v, damping)`` applies ``1 / (lambda + damping)``
in the eigenbasis; another ``response`` (e.g. the unrolled-training response) is a parameter,
not a new class.

- ``IdentityCurvature``: no preconditioning; scores are gradient dot products.
- ``DiagonalCurvature``: ``G ~ diag(E_m[dW_m ** 2])`` (the basis is the identity).
- ``EigenCurvature``: ``G ~ (Q_S kron Q_A) diag(vec(Lambda)) (Q_S kron Q_A)^T``: K-FAC
  (``Lambda = T * outer(eig(S), eig(A))``) and EK-FAC (Lambda = the exact diagonal of G in that
  basis) differ only in Lambda.
- ``DenseEigenCurvature``: a dense ``G = Q diag(e) Q^T`` over all of a (small, e.g. projected)
  layer's coordinates.
"""

from __future__ import annotations

import torch

from ..engine import LayerCapture, per_example_grads

__all__ = [
    "DAMPING_SCALE",
    "Inverse",
    "INVERSE",
    "LayerCurvature",
    "IdentityCurvature",
    "DiagonalCurvature",
    "EigenCurvature",
    "DenseEigenCurvature",
    "rotated_grads",
]

# The paper's damping rule: lambda = 0.1 x mean eigenvalue of the layer's curvature.
DAMPING_SCALE = 0.1


class Inverse:
    """The influence function's response ``1 / (lambda + damping)`` per eigen-direction.

    A *response* is the spectral function that scoring applies to each eigenvalue of the
    fitted curvature; subclasses (e.g. the unrolled-training response) override ``apply`` and
    ``spec``. ``spec()`` identifies it in cache keys and saved metadata.
    """

    def spec(self) -> dict:
        return {"kind": "inverse"}

    def apply(self, coords: torch.Tensor, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
        """``coords`` (in the eigenbasis) times the response of each coordinate's eigenvalue."""
        return coords / (eigenvalues + damping)

    def without_curvature(self, v: torch.Tensor) -> torch.Tensor:
        """The response where no curvature is modelled (strategy "identity"): influence uses v itself."""
        return v


INVERSE = Inverse()


class LayerCurvature:
    """Base class: a symmetric PSD operator on [..., O, I] tensors for one layer."""

    kind = "base"
    shape: tuple[int, int]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """G v."""
        raise NotImplementedError

    def solve(self, v: torch.Tensor, damping: float, response: Inverse = INVERSE) -> torch.Tensor:
        """``response(G, damping) v``; by default ``(G + damping I)^-1 v``."""
        raise NotImplementedError

    def default_damping(self) -> float:
        """The paper's rule: 0.1 x the mean eigenvalue."""
        return 0.0

    def eigenvalues(self) -> torch.Tensor:
        """The operator's eigenvalues (any order; for checks such as a zero damping)."""
        return torch.zeros(0, dtype=torch.float64)

    def to_dense(self) -> torch.Tensor:
        """The [O*I, O*I] matrix in row-major vec order (small layers and tests only)."""
        o, i = self.shape
        eye = torch.eye(o * i, dtype=torch.float64).reshape(o * i, o, i)
        return self.matvec(eye).reshape(o * i, o * i).T

    def tensors(self) -> dict[str, torch.Tensor]:
        """What to save: the constructor's tensors by name."""
        return {}


class IdentityCurvature(LayerCurvature):
    """G = 0 and no damping: ``solve`` returns its input, so scores are gradient dot products."""

    kind = "identity"

    def __init__(self, shape: tuple[int, int]):
        self.shape = tuple(shape)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(v)

    def solve(self, v: torch.Tensor, damping: float, response: Inverse = INVERSE) -> torch.Tensor:
        return response.without_curvature(v)


class DiagonalCurvature(LayerCurvature):
    """``G ~ diag(E_m[dW_m ** 2])``: eigenvalues [O, I], eigenbasis the identity."""

    kind = "diagonal"

    def __init__(self, diag: torch.Tensor):
        self.diag = diag  # [O, I], float64
        self.shape = tuple(diag.shape)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.diag.to(v.dtype)

    def solve(self, v: torch.Tensor, damping: float, response: Inverse = INVERSE) -> torch.Tensor:
        return response.apply(v, self.diag.to(v.dtype), damping)

    def default_damping(self) -> float:
        return DAMPING_SCALE * self.diag.mean().item()

    def eigenvalues(self) -> torch.Tensor:
        return self.diag.flatten()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"diag": self.diag}


class EigenCurvature(LayerCurvature):
    """Kronecker eigenbasis ``Q_S kron Q_A`` with per-coordinate eigenvalues Lambda [O, I] (K-FAC or EK-FAC)."""

    kind = "eigen"

    def __init__(self, q_a: torch.Tensor, q_s: torch.Tensor, lam: torch.Tensor):
        self.q_a, self.q_s, self.lam = q_a, q_s, lam  # [I,I], [O,O], [O,I]; float64
        self.shape = tuple(lam.shape)
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def cast(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q_A, Q_S, Lambda) in ``like``'s dtype and device, converted once and kept."""
        key = (like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = tuple(t.to(like.device, like.dtype) for t in (self.q_a, self.q_s, self.lam))
        return self._cast[key]

    def release_casts(self) -> None:
        """Forget the converted copies ``cast`` keeps (once the queries are preconditioned, the
        scoring pass never needs them, and for GPT-2 they hold as much as the factors)."""
        self._cast.clear()

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        """Q_S^T v Q_A: coordinates of v in the eigenbasis."""
        q_a, q_s, _ = self.cast(v)
        return q_s.mT @ v @ q_a

    def unrotate(self, r: torch.Tensor) -> torch.Tensor:
        q_a, q_s, _ = self.cast(r)
        return q_s @ r @ q_a.mT

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.unrotate(self.rotate(v) * self.cast(v)[2])

    def solve(self, v: torch.Tensor, damping: float, response: Inverse = INVERSE) -> torch.Tensor:
        return self.unrotate(response.apply(self.rotate(v), self.cast(v)[2], damping))

    def default_damping(self) -> float:
        return DAMPING_SCALE * self.lam.mean().item()

    def eigenvalues(self) -> torch.Tensor:
        return self.lam.flatten()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q_a": self.q_a, "q_s": self.q_s, "lam": self.lam}


class DenseEigenCurvature(LayerCurvature):
    """Dense G [d, d] (d = O * I) held as ``Q diag(e) Q^T``, acting on [..., O, I].

    Eigenvectors rather than a Cholesky factor, so every query may pick its damping.
    """

    kind = "dense"

    def __init__(self, eigvals: torch.Tensor, eigvecs: torch.Tensor, shape: tuple[int, int]):
        self.eigvals, self.eigvecs = eigvals, eigvecs  # [d], [d, d]; float64
        self.shape = tuple(shape)

    def _basis(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.eigvals.to(v.device, v.dtype), self.eigvecs.to(v.device, v.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        e, q = self._basis(v)
        flat = v.reshape(*v.shape[:-2], -1)
        return (((flat @ q) * e) @ q.mT).reshape(v.shape)

    def solve(self, v: torch.Tensor, damping: float, response: Inverse = INVERSE) -> torch.Tensor:
        e, q = self._basis(v)
        flat = v.reshape(*v.shape[:-2], -1)
        return (response.apply(flat @ q, e, damping) @ q.mT).reshape(v.shape)

    def default_damping(self) -> float:
        return DAMPING_SCALE * self.eigvals.mean().item()

    def eigenvalues(self) -> torch.Tensor:
        return self.eigvals

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"eigvals": self.eigvals, "eigvecs": self.eigvecs}


def rotated_grads(c: LayerCapture, op: EigenCurvature) -> torch.Tensor:
    """Per-example gradients in the eigenbasis, [N, O, I], by whichever order is cheaper.

    Rotating tokens first costs S(I^2 + O^2 + OI) per example; forming dW first costs
    S*O*I + O*I*(O + I). Long sequences favour the second, short ones the first.
    """
    a, g = c.a, c.g
    s, i, o = a.shape[1], a.shape[2], g.shape[2]
    if s * (i * i + o * o + o * i) <= s * o * i + o * i * (o + i):
        q_a, q_s, _ = op.cast(a)
        return per_example_grads(a @ q_a, g @ q_s)
    return op.rotate(per_example_grads(a, g))
