"""LiSSA: the stochastic Neumann-series inverse the paper compares EK-FAC against.

Agarwal, Bullins and Hazan (2017), as used for influence functions by Koh and Liang (2017)
and as the baseline of Grosse et al. (2023). For a damped Gauss-Newton matrix ``A = G + lambda I``
and a vector v, iterate

    x_0 = v,    x_{j+1} = v + x_j - (G_{B_j} + lambda I) x_j / scale,

where ``G_{B_j}`` is the Gauss-Newton matrix of a random minibatch B_j. The fixed point is
``x = scale * A^{-1} v``, so the estimate is ``x_J / scale``, averaged over ``repeats``
independent runs. The recursion converges when every eigenvalue of ``A_B / scale`` lies in
(0, 2), so ``scale`` must exceed half the largest eigenvalue of any minibatch's ``A_B``; the
error in an eigendirection with eigenvalue mu decays like ``(1 - (mu + lambda)/scale)^J``,
which is why LiSSA needs thousands of steps when the damping is small.

Unlike the engine's strategies, this is **not** block-diagonal: products with G cover every
tracked parameter at once, cross-layer terms included, as in the paper's LiSSA. Query vectors
are vmapped, so all queries share each minibatch's forward pass.

Example::

    ls = LiSSA(model, task=hw.ClassificationTask(), damping=1e-3, depth=2000)
    scores = ls.scores(queries, train)          # [Q, N], the engine's sign convention
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..data import check_data
from ..gauss_newton import (
    ParameterSpace,
    differentiable_attention,
    eval_mode,
    gauss_newton_product,
    layer_gradients,
    stream_scores,
)
from ..layers import select_layers
from ..scoring import Scores
from ..task import LanguageModelingTask, Task
from ..validation import check_int

__all__ = ["LiSSA"]

# scale = SCALE_MARGIN x (largest eigenvalue of G + damping): minibatch Gauss-Newton matrices
# have larger top eigenvalues than the full-data G, and the recursion diverges past 2x.
SCALE_MARGIN = 2.0


class LiSSA:
    """Inverse-Gauss-Newton-vector products by the LiSSA recursion, and scores from them.

    Parameters
    ----------
    model, task, modules
        As for ``hw.Attributor``; the products cover every parameter of the tracked layers.
    damping : float
        lambda in ``(G + lambda I)^-1``; give the same absolute value as the methods you compare.
    scale : float or None
        Must exceed the largest eigenvalue of ``G_B + lambda I``. None estimates the top
        eigenvalue of G by power iteration and uses ``SCALE_MARGIN`` times (it + damping).
    depth : int
        Recursion steps J per repeat.
    repeats : int
        Independent recursions averaged (each with its own minibatch order).
    batch_size : int
        Training examples per Gauss-Newton-vector product; ``>= len(train)`` is deterministic.
    seed : int
        Seeds the minibatch draws.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | None = None,
        modules: None | str | list[str] = None,
        damping: float = 1e-3,
        scale: float | None = None,
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int = 32,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
            raise ValueError(f"damping must be a non-negative number, got {damping!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
            raise ValueError(f"scale must be None (estimate it) or a positive number, got {scale!r}")
        check_int(depth, "depth")
        check_int(repeats, "repeats")
        self.model = model
        self.task = task if task is not None else LanguageModelingTask()
        self.layers = select_layers(model, modules)
        self.space = ParameterSpace(model, self.layers)
        self.damping = float(damping)
        self.scale = None if scale is None else float(scale)
        self.depth = depth
        self.repeats = repeats
        self.batch_size = check_int(batch_size, "batch_size")
        self.seed = seed

    # ------------------------------------------------------------------ products
    def _gnvp(self, train: Any, idx: list[int], v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(1/|B|) sum_{m in B} J_m^T H_m J_m v for the examples ``idx``."""
        batch = self.task.to_device(self.task.collate([train[i] for i in idx]), v[next(iter(v))].device)
        gv = gauss_newton_product(self.model, self.task, self.space, batch, v)
        return {n: t / len(idx) for n, t in gv.items()}

    def _full_gnvp(self, train: Any, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = len(train)
        out = {k: torch.zeros_like(t) for k, t in v.items()}
        b = max(self.batch_size, 64)  # the same full-data G either way; bigger batches amortize overhead
        for lo in range(0, n, b):
            idx = list(range(lo, min(n, lo + b)))
            for k, t in self._gnvp(train, idx, v).items():
                out[k] += t * len(idx) / n
        return out

    def top_eigenvalue(self, train: Any, iters: int = 20) -> float:
        """Largest eigenvalue of the full-data G, by power iteration (``iters`` passes over ``train``)."""
        train = check_data(train, "training data")
        gen = torch.Generator().manual_seed(self.seed)
        dtype = next(iter(self.space.params().values())).dtype
        v = torch.randn(1, self.space.size, generator=gen, dtype=torch.float64).to(dtype)
        v = v / v.norm()
        top = 0.0
        with eval_mode(self.model), differentiable_attention(self.model):
            for _ in range(iters):
                gv = self.space.flatten(self._full_gnvp(train, self.space.unflatten(v)))
                top = float((gv * v).sum().detach())
                v = gv / gv.norm().clamp_min(1e-30)
        return top

    # ------------------------------------------------------------------ solve
    def solve(self, vectors: dict[str, torch.Tensor], train: Any) -> dict[str, torch.Tensor]:
        """``(G + damping I)^-1 v`` for canonical blocks [Q, O, I] per tracked layer."""
        train = check_data(train, "training data")
        missing = [n for n in self.layers if n not in vectors]
        if missing:
            raise ValueError(
                f"vectors has no block for tracked layer(s) {missing[:4]}; give one [Q, O, I] tensor per layer"
            )
        scale = self.scale
        if scale is None:
            scale = SCALE_MARGIN * (self.top_eigenvalue(train) + self.damping)
        self.scale_used = scale
        n = len(train)
        b = min(self.batch_size, n)
        dtype = next(iter(self.space.params().values())).dtype
        v = {k: vectors[k].to(dtype) for k in self.layers}
        total = {k: torch.zeros_like(t) for k, t in v.items()}
        with eval_mode(self.model), differentiable_attention(self.model):
            for r in range(self.repeats):
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
                order: list[int] = []
                x = {k: t.clone() for k, t in v.items()}
                for _ in range(self.depth):
                    if len(order) < b:  # draw without replacement within an epoch
                        order += torch.randperm(n, generator=gen).tolist()
                    idx, order = order[:b], order[b:]
                    gx = self._gnvp(train, idx, x)
                    x = {k: v[k] + x[k] - (gx[k] + self.damping * x[k]) / scale for k in x}
                    if not all(torch.isfinite(t).all() for t in x.values()):
                        raise ArithmeticError(
                            f"LiSSA diverged (scale={scale:.4g} is below the largest eigenvalue of a "
                            f"minibatch's G + damping); pass a larger scale, or a larger batch_size"
                        )
                for k in total:
                    total[k] += x[k] / scale
        return {k: t / self.repeats for k, t in total.items()}

    def query_gradients(self, queries: Any, train: Any, batch_size: int = 8) -> dict[str, torch.Tensor]:
        """LiSSA-preconditioned measurement gradients ``(G + lambda I)^-1 grad f_q``: [Q, O, I] per layer."""
        queries = check_data(queries, "queries")
        q = layer_gradients(
            self.model, self.task, self.layers, queries, check_int(batch_size, "batch_size"), measurement=True
        )
        return self.solve(q, train)

    def scores(self, queries: Any, train: Any, batch_size: int = 8) -> Scores:
        """``grad f_q^T (G + lambda I)^-1 grad L_m``, [Q, N]; positive = upweighting m lowers f_q."""
        train = check_data(train, "training data")
        p = self.query_gradients(queries, train, batch_size)
        values = stream_scores(self.model, self.task, self.layers, p, train, check_int(batch_size, "batch_size"))
        meta = {
            "strategy": "lissa",
            "damping": self.damping,
            "scale": self.scale_used,
            "depth": self.depth,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
        }
        return Scores(values, meta=meta)


def convergence_steps(scale: float, damping: float, tol: float = 1e-2) -> int:
    """Steps for the slowest (zero-curvature) direction's error to fall below ``tol``."""
    return math.ceil(math.log(tol) / math.log1p(-damping / scale))
