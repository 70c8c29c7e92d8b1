"""Curvature: per-layer estimates of the Gauss-Newton matrix G, as linear operators.

Each strategy is a block-diagonal (per tracked layer) approximation of the per-sequence
Gauss-Newton matrix ``G = E_m[vec(dW_m) vec(dW_m)^T]``, where ``dW_m = sum_t g_t a_t^T`` is
the pseudo-gradient of sequence m in canonical layout [O, I]. Vectors are row-major
flattenings of [O, I] matrices, so ``vec(S V A) = (S kron A^T) vec(V)``.

Operators (what scoring uses; all act on [..., O, I] tensors):

- ``IdentityCurvature``: no preconditioning; scores are gradient dot products.
- ``DiagonalCurvature``: ``G ~ diag(E_m[dW_m ** 2])``.
- ``EigenCurvature``: ``G ~ (Q_S kron Q_A) diag(vec(Lambda)) (Q_S kron Q_A)^T``.
  K-FAC sets ``Lambda = T * outer(eig(S), eig(A))`` with per-token second moments A, S and
  T the mean number of scored tokens per sequence (so K-FAC and EK-FAC estimate the same
  per-sequence G, and their damping compares). EK-FAC replaces Lambda by
  ``E_m[(Q_S^T dW_m Q_A) ** 2]``, the exact diagonal of G in that eigenbasis.

Accumulators (what fitting uses) consume the capture stream batch by batch, in fp32 per batch
and float64 across batches.
"""

from __future__ import annotations

import torch

from .capture import LayerCapture
from .errors import check_finite

__all__ = [
    "DAMPING_SCALE",
    "LayerCurvature",
    "IdentityCurvature",
    "DiagonalCurvature",
    "EigenCurvature",
    "CovarianceAccumulator",
    "LambdaAccumulator",
    "DiagonalAccumulator",
    "per_example_grads",
]

# The paper's damping rule: lambda = 0.1 x mean eigenvalue of the layer's curvature.
DAMPING_SCALE = 0.1


def per_example_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a [N,S,I], g [N,S,O] -> per-example gradients [N,O,I] = sum_s g a^T."""
    return torch.einsum("nso,nsi->noi", g, a)


# ---------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------


class LayerCurvature:
    """Base class: a symmetric PSD operator on [..., O, I] tensors for one layer."""

    kind = "base"

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """G v."""
        raise NotImplementedError

    def solve(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        """(G + damping I)^-1 v."""
        raise NotImplementedError

    def default_damping(self) -> float:
        """The paper's rule: 0.1 x the mean eigenvalue."""
        return 0.0

    def to_dense(self) -> torch.Tensor:
        """The [O*I, O*I] matrix in row-major vec order (small layers and tests only)."""
        o, i = self.shape
        eye = torch.eye(o * i, dtype=torch.float64).reshape(o * i, o, i)
        return self.matvec(eye).reshape(o * i, o * i).T

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    shape: tuple[int, int]


class IdentityCurvature(LayerCurvature):
    """G = 0 and no damping: ``solve`` returns its input, so scores are gradient dot products."""

    kind = "identity"

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(v)

    def solve(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        return v


class DiagonalCurvature(LayerCurvature):
    kind = "diagonal"

    def __init__(self, diag: torch.Tensor):
        self.diag = diag  # [O, I], float64
        self.shape = tuple(diag.shape)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.diag.to(v.dtype)

    def solve(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        return v / (self.diag + damping).to(v.dtype)

    def default_damping(self) -> float:
        return DAMPING_SCALE * self.diag.mean().item()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"diag": self.diag}


class EigenCurvature(LayerCurvature):
    """Kronecker eigenbasis with per-coordinate eigenvalues Lambda [O, I] (K-FAC or EK-FAC)."""

    kind = "eigen"

    def __init__(self, q_a: torch.Tensor, q_s: torch.Tensor, lam: torch.Tensor):
        self.q_a, self.q_s, self.lam = q_a, q_s, lam  # [I,I], [O,O], [O,I]; float64
        self.shape = tuple(lam.shape)
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _as(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (v.dtype, v.device)
        if key not in self._cast:
            self._cast[key] = tuple(t.to(v.device, v.dtype) for t in (self.q_a, self.q_s, self.lam))
        return self._cast[key]

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        """Q_S^T v Q_A: coordinates of v in the eigenbasis."""
        q_a, q_s, _ = self._as(v)
        return q_s.mT @ v @ q_a

    def unrotate(self, r: torch.Tensor) -> torch.Tensor:
        q_a, q_s, _ = self._as(r)
        return q_s @ r @ q_a.mT

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.unrotate(self.rotate(v) * self._as(v)[2])

    def solve(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        return self.unrotate(self.rotate(v) / (self._as(v)[2] + damping))

    def default_damping(self) -> float:
        return DAMPING_SCALE * self.lam.mean().item()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q_a": self.q_a, "q_s": self.q_s, "lam": self.lam}


# ---------------------------------------------------------------------------------------
# Accumulators: consumers of the capture stream
# ---------------------------------------------------------------------------------------


class CovarianceAccumulator:
    """Uncentered per-token second moments A = E[a a^T], S = E[g g^T] over scored tokens.

    With several pseudo-losses per forward (``fisher="exact"``) S sums over them while A and
    the token counts are taken once (``first=True``).
    """

    def __init__(self) -> None:
        self.a: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, float] = {}
        self.sequences: dict[str, float] = {}

    def update(self, c: LayerCapture, first: bool = True) -> None:
        a, g = c.a, c.g
        if c.mask is not None:
            a, g = a[c.mask], g[c.mask]  # [M, I], [M, O]
        else:
            a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        if c.name not in self.s:
            self.a[c.name] = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
            self.s[c.name] = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64, device=g.device)
            self.tokens[c.name] = 0.0
            self.sequences[c.name] = 0.0
        if first:
            self.a[c.name] += (a.mT @ a).double()
            self.tokens[c.name] += float(a.shape[0])
            self.sequences[c.name] += float(c.a.shape[0])
        self.s[c.name] += (g.mT @ g).double()

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.s:
            out[f"{n}::A"] = self.a[n]
            out[f"{n}::S"] = self.s[n]
            out[f"{n}::counts"] = torch.tensor([self.tokens[n], self.sequences[n]], dtype=torch.float64)
        return out

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> CovarianceAccumulator:
        acc = cls()
        for key, t in state.items():
            name, field = key.rsplit("::", 1)
            if field == "A":
                acc.a[name] = t
            elif field == "S":
                acc.s[name] = t
            else:
                acc.tokens[name], acc.sequences[name] = t.tolist()
        return acc

    def eigendecompose(self, name: str) -> tuple[torch.Tensor, ...]:
        """fp64 eigendecomposition of the normalized A and S; negative round-off clamped."""
        tokens = self.tokens[name]
        if tokens == 0:
            raise ValueError(f"layer {name!r} saw no scored tokens while fitting")
        a = check_finite(self.a[name] / tokens, name, "input covariance A")
        s = check_finite(self.s[name] / tokens, name, "gradient covariance S")
        eig_a, q_a = torch.linalg.eigh(a.double())
        eig_s, q_s = torch.linalg.eigh(s.double())
        return q_a, eig_a.clamp_min(0), q_s, eig_s.clamp_min(0)

    def kfac(self, name: str) -> EigenCurvature:
        q_a, eig_a, q_s, eig_s = self.eigendecompose(name)
        mean_tokens = self.tokens[name] / self.sequences[name]
        return EigenCurvature(q_a, q_s, mean_tokens * torch.outer(eig_s, eig_a))


def rotated_grads(c: LayerCapture, op: EigenCurvature) -> torch.Tensor:
    """Per-example gradients in the eigenbasis, [N, O, I], by whichever order is cheaper.

    Rotating tokens first costs S(I^2 + O^2 + OI) per example; forming dW first costs
    S*O*I + O*I*(O + I). Long sequences favour the second, short ones the first.
    """
    a, g = c.a, c.g
    s, i, o = a.shape[1], a.shape[2], g.shape[2]
    if s * (i * i + o * o + o * i) <= s * o * i + o * i * (o + i):
        q_a, q_s, _ = op._as(a)
        return per_example_grads(a @ q_a, g @ q_s)
    return op.rotate(per_example_grads(a, g))


class LambdaAccumulator:
    """EK-FAC's eigenvalue correction: mean over sequences of (Q_S^T dW_m Q_A) ** 2."""

    def __init__(self, bases: dict[str, EigenCurvature]):
        self.bases = bases
        self.sums: dict[str, torch.Tensor] = {}
        self.sequences: dict[str, float] = {}

    def update(self, c: LayerCapture, first: bool = True) -> None:
        r = rotated_grads(c, self.bases[c.name])
        sq = (r * r).sum(0).double()
        if c.name not in self.sums:
            self.sums[c.name] = torch.zeros_like(sq)
            self.sequences[c.name] = 0.0
        self.sums[c.name] += sq
        if first:
            self.sequences[c.name] += float(r.shape[0])

    def ekfac(self, name: str) -> EigenCurvature:
        base = self.bases[name]
        lam = check_finite(self.sums[name] / self.sequences[name], name, "eigenvalue correction")
        return EigenCurvature(base.q_a, base.q_s, lam)


class DiagonalAccumulator:
    """Diagonal of G: mean over sequences of the squared per-sequence pseudo-gradient."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.sequences: dict[str, float] = {}

    def update(self, c: LayerCapture, first: bool = True) -> None:
        dw = per_example_grads(c.a, c.g)
        sq = (dw * dw).sum(0).double()
        if c.name not in self.sums:
            self.sums[c.name] = torch.zeros_like(sq)
            self.sequences[c.name] = 0.0
        self.sums[c.name] += sq
        if first:
            self.sequences[c.name] += float(dw.shape[0])

    def diagonal(self, name: str) -> DiagonalCurvature:
        d = check_finite(self.sums[name] / self.sequences[name], name, "diagonal curvature")
        return DiagonalCurvature(d)
