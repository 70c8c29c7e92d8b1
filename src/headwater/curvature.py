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

import contextlib
import warnings
from collections.abc import Iterator

import torch

from .capture import LayerCapture
from .errors import ZeroCurvatureWarning, check_finite
from .validation import check_number

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
    "resolve_damping",
    "warn_zero_curvature",
]

# The paper's damping rule: lambda = 0.1 x mean eigenvalue of the layer's curvature.
DAMPING_SCALE = 0.1


def per_example_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a [N,S,I], g [N,S,O] -> per-example gradients [N,O,I] = sum_s g a^T."""
    return torch.einsum("nso,nsi->noi", g, a)


@contextlib.contextmanager
def lapack_threads(t: torch.Tensor) -> Iterator[None]:
    """Run CPU LAPACK calls (eigh) on one thread.

    OpenBLAS's threaded eigh spins while it waits: on a machine whose cores are shared it was
    measured 150-500x slower with 2 threads than with 1 (a 1024x1024 fp64 eigh: 49 s vs 0.33 s),
    and single-threaded eigh loses little even on an idle machine.
    """
    if t.device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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

    def eigenvalues(self) -> torch.Tensor:
        """The operator's eigenvalues (any order; for checks such as a zero damping)."""
        return torch.zeros(0, dtype=torch.float64)

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

    def eigenvalues(self) -> torch.Tensor:
        return self.diag.flatten()

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

    def eigenvalues(self) -> torch.Tensor:
        return self.lam.flatten()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q_a": self.q_a, "q_s": self.q_s, "lam": self.lam}


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
        "the layer outputs changes the loss (e.g. a fresh LoRA adapter with B = 0). The paper's damping "
        f"would be 0; these layers use damping {floor:.3g} instead "
        + ("(the smallest other layer's)" if floor != 1.0 or len(zero) < len(curvature) else "(every layer is flat)"),
        ZeroCurvatureWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------
# Accumulators: consumers of the capture stream
# ---------------------------------------------------------------------------------------


class _Accumulator:
    """Shared plumbing: preallocated float64 sums per layer, so every rank holds the same keys.

    ``state()`` returns the live tensors: summing them across ranks in place (all-reduce) or
    saving and reloading them (checkpoints) is all that distribution and resumption need.
    """

    def __init__(self, shapes: dict[str, dict[str, tuple[int, ...]]], device: torch.device | str = "cpu"):
        self.sums = {
            f"{n}::{field}": torch.zeros(shape, dtype=torch.float64, device=device)
            for n, fields in shapes.items()
            for field, shape in fields.items()
        }

    def _add(self, name: str, field: str, value: torch.Tensor) -> None:
        self.sums[f"{name}::{field}"] += value.to(torch.float64)

    def get(self, name: str, field: str) -> torch.Tensor:
        return self.sums[f"{name}::{field}"]

    def state(self) -> dict[str, torch.Tensor]:
        return self.sums

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.sums) - set(tensors)
        if missing:
            raise ValueError(f"saved state lacks {sorted(missing)[:3]}; it belongs to another layer set")
        for k, t in self.sums.items():
            t.copy_(tensors[k])


class CovarianceAccumulator(_Accumulator):
    """Uncentered per-token second moments A = E[a a^T], S = E[g g^T] over scored tokens.

    With several pseudo-losses per forward (``fisher="exact"``) S sums over them while A and
    the token counts are taken once (``first=True``). ``counts`` = (tokens, sequences).
    """

    def __init__(self, layers: dict, device: torch.device | str = "cpu"):
        super().__init__(
            {n: {"A": (ad.in_features,) * 2, "S": (ad.out_features,) * 2, "counts": (2,)} for n, ad in layers.items()},
            device,
        )

    def update(self, c: LayerCapture, first: bool = True) -> None:
        a, g = c.a, c.g
        if c.mask is not None:
            a, g = a[c.mask], g[c.mask]  # [M, I], [M, O]
        else:
            a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        if first:
            self._add(c.name, "A", a.mT @ a)
            counts = self.get(c.name, "counts")
            counts[0] += a.shape[0]  # scored tokens
            counts[1] += c.a.shape[0]  # sequences
        self._add(c.name, "S", g.mT @ g)

    def eigendecompose(self, name: str) -> list[torch.Tensor]:
        """fp64 eigendecomposition of the normalized A and S: [q_a, eig_a, q_s, eig_s]."""
        tokens = self.get(name, "counts")[0].item()
        if tokens == 0:
            raise ValueError(f"layer {name!r} saw no scored tokens while fitting")
        a = check_finite(self.get(name, "A") / tokens, name, "input covariance A")
        s = check_finite(self.get(name, "S") / tokens, name, "gradient covariance S")
        with lapack_threads(a):
            eig_a, q_a = torch.linalg.eigh(a)
            eig_s, q_s = torch.linalg.eigh(s)
        return [q_a.contiguous(), eig_a.clamp_min(0), q_s.contiguous(), eig_s.clamp_min(0)]

    def kfac(self, name: str, eig: list[torch.Tensor] | None = None) -> EigenCurvature:
        """K-FAC operator; ``eig`` is this layer's ``eigendecompose`` result if already computed."""
        q_a, eig_a, q_s, eig_s = eig if eig is not None else self.eigendecompose(name)
        tokens, sequences = self.get(name, "counts").tolist()
        return EigenCurvature(q_a, q_s, (tokens / sequences) * torch.outer(eig_s, eig_a))


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


class LambdaAccumulator(_Accumulator):
    """EK-FAC's eigenvalue correction: mean over sequences of (Q_S^T dW_m Q_A) ** 2."""

    def __init__(self, bases: dict[str, EigenCurvature], device: torch.device | str = "cpu"):
        super().__init__({n: {"lam": op.shape, "sequences": (1,)} for n, op in bases.items()}, device)
        self.bases = bases

    def update(self, c: LayerCapture, first: bool = True) -> None:
        r = rotated_grads(c, self.bases[c.name])
        self._add(c.name, "lam", (r * r).sum(0))
        if first:
            self.get(c.name, "sequences").add_(r.shape[0])

    def ekfac(self, name: str) -> EigenCurvature:
        base = self.bases[name]
        lam = check_finite(self.get(name, "lam") / self.get(name, "sequences"), name, "eigenvalue correction")
        return EigenCurvature(base.q_a, base.q_s, lam)


class DiagonalAccumulator(_Accumulator):
    """Diagonal of G: mean over sequences of the squared per-sequence pseudo-gradient."""

    def __init__(self, layers: dict, device: torch.device | str = "cpu"):
        super().__init__(
            {n: {"diag": (ad.out_features, ad.in_features), "sequences": (1,)} for n, ad in layers.items()}, device
        )

    def update(self, c: LayerCapture, first: bool = True) -> None:
        dw = per_example_grads(c.a, c.g)
        self._add(c.name, "diag", (dw * dw).sum(0))
        if first:
            self.get(c.name, "sequences").add_(dw.shape[0])

    def diagonal(self, name: str) -> DiagonalCurvature:
        d = check_finite(self.get(name, "diag") / self.get(name, "sequences"), name, "diagonal curvature")
        return DiagonalCurvature(d)
