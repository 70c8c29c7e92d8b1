"""Accumulators: consumers of the pass loop that estimate each layer's curvature.

They are keyed by layer name and shape ``(O, I)`` only, so the same classes fit the engine's
curvature on full captures and the index's on projected ones (wrap them in ``Projected``).
Per batch they add float32 (or float64) products into preallocated float64 sums; the sums are
the whole state, so summing them across ranks (all-reduce) or saving and reloading them
(checkpoints) is all that distribution and resumption need.

- ``CovarianceAccumulator``: K-FAC's uncentered per-token A = E[a a^T], S = E[g g^T] over scored
  tokens, then ``kfac()``: the eigendecompositions, spread over ranks.
- ``LambdaAccumulator``: EK-FAC's eigenvalue correction E_m[(Q_S^T dW_m Q_A)^2].
- ``DiagonalAccumulator``: E_m[dW_m^2].
- ``DenseAccumulator``: the dense E_m[vec(dW_m) vec(dW_m)^T] of a small (projected) layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..distributed import all_reduce_, broadcast_, rank_world
from ..engine import Consumer, LayerCapture, per_example_grads
from ..errors import check_finite
from .linalg import symmetric_eigh, symmetric_eigh_many
from .operators import DenseEigenCurvature, DiagonalCurvature, EigenCurvature, rotated_grads

__all__ = [
    "Accumulator",
    "CovarianceAccumulator",
    "LambdaAccumulator",
    "DiagonalAccumulator",
    "DenseAccumulator",
    "Projected",
]

Shapes = Mapping[str, tuple[int, int]]  # layer -> (O, I)


class Accumulator(Consumer):
    """Preallocated float64 sums ``{layer}::{field}``, so every rank holds (and reduces) the same keys."""

    def __init__(self, fields: dict[str, dict[str, tuple[int, ...]]], device: torch.device | str = "cpu"):
        self.sums = {
            f"{n}::{field}": torch.zeros(shape, dtype=torch.float64, device=device)
            for n, per_layer in fields.items()
            for field, shape in per_layer.items()
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

    # the pass loop's checkpoint protocol: the sums are the whole state
    def checkpoint(self) -> dict[str, torch.Tensor]:
        return self.sums

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state(tensors)

    def finish_pass(self) -> None:
        all_reduce_(self.sums)  # each rank summed its own batches


class CovarianceAccumulator(Accumulator):
    """Uncentered per-token second moments A = E[a a^T], S = E[g g^T] over scored tokens.

    With several pseudo-losses per forward (``fisher="exact"``, ``samples > 1``) S sums over
    them while A and the token counts are taken once (``first``). ``counts`` = (tokens, sequences).
    """

    def __init__(self, shapes: Shapes, device: torch.device | str = "cpu"):
        self.shapes = dict(shapes)
        super().__init__({n: {"A": (i, i), "S": (o, o), "counts": (2,)} for n, (o, i) in self.shapes.items()}, device)

    def update(self, c: LayerCapture, start: int = 0, first: bool = True) -> None:
        a, g = c.a, c.g
        tokens: torch.Tensor | int
        if c.mask is not None and a.device.type != "cpu":
            # On a GPU, weight by the mask instead of indexing with it: a boolean index needs the
            # count of selected rows on the host (a sync per layer); masked rows add zero.
            m = c.mask.reshape(-1, 1).to(a.dtype)
            a, g = a.reshape(-1, a.shape[-1]) * m, g.reshape(-1, g.shape[-1]) * m
            tokens = c.mask.sum()
        elif c.mask is not None:
            a, g = a[c.mask], g[c.mask]  # [M, I], [M, O]; on the CPU the same sums bit for bit as before
            tokens = a.shape[0]
        else:
            a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            tokens = a.shape[0]
        if first:
            self._add(c.name, "A", a.mT @ a)
            counts = self.get(c.name, "counts")
            counts[0] += tokens  # scored tokens
            counts[1] += c.a.shape[0]  # sequences
        self._add(c.name, "S", g.mT @ g)

    def _normalized(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A / tokens and S / tokens. A layer that saw no scored token (an expert no token was routed
        to) has zero factors: zero curvature, which ``warn_zero_curvature`` reports and the
        damping floor keeps finite."""
        tokens = max(self.get(name, "counts")[0].item(), 1.0)
        a = check_finite(self.get(name, "A") / tokens, name, "input covariance A")
        s = check_finite(self.get(name, "S") / tokens, name, "gradient covariance S")
        return a, s

    def eigendecompose(self, names: list[str], workers: int | None = None) -> dict[str, list[torch.Tensor]]:
        """Eigendecompositions of the normalized A and S of ``names``: {layer: [q_a, eig_a, q_s, eig_s]}.

        All of their factors go to ``symmetric_eigh_many`` together: float64, concurrent
        single-threaded calls (``curvature.linalg`` measures why both).
        """
        out = symmetric_eigh_many([m for n in names for m in self._normalized(n)], workers=workers)
        res = {}
        for i, n in enumerate(names):
            (eig_a, q_a), (eig_s, q_s) = out[2 * i], out[2 * i + 1]
            res[n] = [q_a.contiguous(), eig_a.clamp_min(0), q_s.contiguous(), eig_s.clamp_min(0)]
        return res

    def kfac_layer(self, name: str, eig: list[torch.Tensor] | None = None) -> EigenCurvature:
        """One layer's K-FAC operator; ``eig`` is its ``eigendecompose`` result if already computed."""
        q_a, eig_a, q_s, eig_s = eig if eig is not None else self.eigendecompose([name])[name]
        tokens, sequences = self.get(name, "counts").tolist()
        return EigenCurvature(q_a, q_s, (tokens / sequences) * torch.outer(eig_s, eig_a))

    def kfac(self, progress: bool = False) -> dict[str, EigenCurvature]:
        """Every layer's K-FAC operator: eigendecomposition of layer i on rank i % world, then broadcast."""
        rank, world = rank_world()
        names = list(self.shapes)
        mine = [n for i, n in enumerate(names) if i % world == rank]
        # two layers per call: one layer's A and S differ too much in size (769 vs 3072) to
        # overlap well; several ranks on one machine keep one worker each
        chunks = [mine[j : j + 2] for j in range(0, len(mine), 2)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), desc="eigendecomposition", unit="layer", leave=False, dynamic_ncols=True)
        eig: dict[str, list[torch.Tensor]] = {}
        for chunk in chunks:
            eig.update(self.eigendecompose(chunk, workers=None if world == 1 else 1))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if world > 1:
            device = self.get(names[0], "A").device
            for i, n in enumerate(names):
                if n not in eig:
                    o, k = self.shapes[n]
                    eig[n] = [torch.empty(s, dtype=torch.float64, device=device) for s in ((k, k), (k,), (o, o), (o,))]
                broadcast_(eig[n], src=i % world)
        return {n: self.kfac_layer(n, eig[n]) for n in names}


class LambdaAccumulator(Accumulator):
    """EK-FAC's eigenvalue correction: mean over sequences of (Q_S^T dW_m Q_A) ** 2."""

    def __init__(self, bases: Mapping[str, EigenCurvature], device: torch.device | str = "cpu"):
        super().__init__({n: {"lam": op.shape, "sequences": (1,)} for n, op in bases.items()}, device)
        self.bases = dict(bases)

    def update(self, c: LayerCapture, start: int = 0, first: bool = True) -> None:
        r = rotated_grads(c, self.bases[c.name])
        self._add(c.name, "lam", (r * r).sum(0))
        if first:
            self.get(c.name, "sequences").add_(r.shape[0])

    def ekfac_layer(self, name: str) -> EigenCurvature:
        base = self.bases[name]
        lam = check_finite(self.get(name, "lam") / self.get(name, "sequences"), name, "eigenvalue correction")
        return EigenCurvature(base.q_a, base.q_s, lam)

    def ekfac(self) -> dict[str, EigenCurvature]:
        return {n: self.ekfac_layer(n) for n in self.bases}


class DiagonalAccumulator(Accumulator):
    """Diagonal of G: mean over sequences of the squared per-sequence pseudo-gradient."""

    def __init__(self, shapes: Shapes, device: torch.device | str = "cpu"):
        self.shapes = dict(shapes)
        super().__init__({n: {"diag": shape, "sequences": (1,)} for n, shape in self.shapes.items()}, device)

    def update(self, c: LayerCapture, start: int = 0, first: bool = True) -> None:
        dw = per_example_grads(c.a, c.g)
        self._add(c.name, "diag", (dw * dw).sum(0))
        if first:
            self.get(c.name, "sequences").add_(dw.shape[0])

    def diagonal(self) -> dict[str, DiagonalCurvature]:
        out = {}
        for n in self.shapes:
            d = check_finite(self.get(n, "diag") / self.get(n, "sequences"), n, "diagonal curvature")
            out[n] = DiagonalCurvature(d)
        return out


class DenseAccumulator(Accumulator):
    """G = mean over sequences of vec(dW_m) vec(dW_m)^T, dense: for layers of a few thousand coordinates."""

    def __init__(self, shapes: Shapes, device: torch.device | str = "cpu"):
        self.shapes = dict(shapes)
        fields = {n: {"G": (o * i, o * i), "sequences": (1,)} for n, (o, i) in self.shapes.items()}
        super().__init__(fields, device)

    def update(self, c: LayerCapture, start: int = 0, first: bool = True) -> None:
        r = per_example_grads(c.a, c.g).reshape(c.a.shape[0], -1)  # [N, d]
        self._add(c.name, "G", r.mT @ r)
        if first:
            self.get(c.name, "sequences").add_(r.shape[0])

    def dense(self) -> dict[str, DenseEigenCurvature]:
        out = {}
        for n, shape in self.shapes.items():
            g = check_finite(self.get(n, "G") / self.get(n, "sequences"), n, "dense Gauss-Newton")
            e, q = symmetric_eigh(g.cpu())
            out[n] = DenseEigenCurvature(e.clamp_min(0), q, shape)
        return out


class Projected(Consumer):
    """Feeds ``inner`` the projected captures ``(a P_in^T, g P_out^T)`` instead of the captures.

    Since ``P_out (sum_t g_t a_t^T) P_in^T = sum_t (P_out g_t)(P_in a_t)^T``, every accumulator
    above then estimates the curvature of the projected gradients without ever forming an
    [O, I] gradient.
    """

    def __init__(self, inner: Consumer | None, projections: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.inner = inner
        self.projections = projections  # layer -> (P_out [k_out, O], P_in [k_in, I])
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def project(self, c: LayerCapture) -> LayerCapture:
        key = (c.name, c.a.dtype, c.a.device)
        if key not in self._cast:
            self._cast[key] = tuple(p.to(c.a.device, c.a.dtype) for p in self.projections[c.name])
        p_out, p_in = self._cast[key]
        return dataclasses.replace(c, a=c.a @ p_in.mT, g=c.g @ p_out.mT)  # [N,S,k_in], [N,S,k_out]

    def records(self, c: LayerCapture) -> torch.Tensor:
        """Projected per-sequence gradients P_out dW P_in^T, [N, k_out, k_in]."""
        pc = self.project(c)
        return per_example_grads(pc.a, pc.g)

    def update(self, c: LayerCapture, start: int, first: bool) -> None:
        self.inner.update(self.project(c), start, first)

    def finish_batch(self, start: int) -> None:
        self.inner.finish_batch(start)

    def checkpoint(self) -> dict[str, torch.Tensor]:
        return self.inner.checkpoint()

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        self.inner.restore(tensors)

    def finish_pass(self) -> None:
        self.inner.finish_pass()
