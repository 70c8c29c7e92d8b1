"""PBRF: the proximal Bregman response function that influence functions approximate.

Grosse et al. (2023), section 5.1, after Bae et al. (2022). With trained weights theta_s, N
training examples and damping lambda, the response to upweighting example m by epsilon is

    theta(eps) = argmin_theta  (1/N) sum_i D(h(theta, x_i), h(theta_s, x_i))
                               + eps * L_m(theta) + (lambda/2) ||theta - theta_s||^2,

where D is the Bregman divergence of the loss on the network outputs,
``D(y, y_s) = l(y) - l(y_s) - grad l(y_s)^T (y - y_s)`` (for softmax cross-entropy, the KL
divergence from the old predictive distribution to the new one; for squared error, half the
squared distance). Its Hessian at theta_s is the damped Gauss-Newton matrix ``G + lambda I``
with G the per-example mean, the very matrix the engine approximates, so to first order

    theta(eps) - theta_s = -eps (G + lambda I)^-1 grad L_m,
    f_q(theta(eps)) - f_q(theta_s) = -eps * score(q, m).

The *PBRF score* is therefore ``-(f_q(theta(eps)) - f_q(theta_s)) / eps``, in the engine's units
and sign (positive = upweighting m lowers f_q).

We default to eps = +1/N (counting example m twice) rather than Bae et al.'s removal, -1/N.
With eps > 0 every term is non-negative, so the objective is bounded below and has a
minimiser. With eps < 0 the ``-L_m / N`` term rewards pushing example m's loss up, which a
two-layer network can do at a cost quadratic in the weights, so at the paper's small damping
the objective can be unbounded below or its minimiser can lie far outside the linear regime
(on the digits MLP some removal responses move the weights by more than their own norm).
Pass ``epsilon=-1/N`` for removal.

The objective is minimised from theta_s by inexact Newton steps (conjugate gradients on exact
Hessian-vector products), in float64 on a copy of the model. The
parameters are those of the tracked layers; the rest of the model is held fixed. This costs
dozens of passes over the training set per example, so it is for small models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..data import check_data, iter_batches
from ..gauss_newton import (
    ParameterSpace,
    cast_batch,
    eval_mode,
    model_output,
    output_loss,
    precise_loss,
    precise_measurement,
)
from ..layers import select_layers
from ..task import Task
from ..validation import check_int
from .lds import Correlation, correlation_summary

__all__ = ["PBRF", "PBRFResponse", "PBRFScores", "pearson_per_query"]

CG_TOL = 1e-4  # relative residual per Newton step: each step gains ~4 digits, 2-3 steps suffice
CG_MAX_ITER = 1000


@dataclass
class PBRFResponse:
    """The solved response for one training example.

    delta: theta(eps) - theta_s as one flat float64 vector over the tracked layers [P], in the
    canonical [O, I] layout of ``headwater.gauss_newton.ParameterSpace``.
    """

    index: int
    delta: torch.Tensor
    converged: bool
    iterations: int
    gradient_norm: float  # final gradient norm relative to the one at theta_s


@dataclass
class PBRFScores:
    """PBRF scores [Q, K] for the K training examples ``indices``; same units and sign as engine scores."""

    values: torch.Tensor
    indices: list[int]
    converged: list[bool]
    meta: dict = field(default_factory=dict)


class PBRF:
    """Solves the PBRF objective for chosen training examples of a small model.

    Parameters
    ----------
    model, task, modules
        As for ``hw.Attributor``. The model is copied to float64; the original is untouched.
    train
        The training data the model was fitted on (all N examples enter the Bregman term).
    damping : float
        lambda, an absolute value. Give the methods you compare the same one.
    epsilon : float or None
        The upweighting; None means +1/N (see the module docstring). Must be non-zero.
    rtol : float
        Stop when the gradient norm falls below ``rtol`` x its value at theta_s.
    max_iter : int
        Newton iterations per example.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Any,
        damping: float,
        modules: None | str | list[str] = None,
        epsilon: float | None = None,
        batch_size: int = 512,
        rtol: float = 1e-7,
        max_iter: int = 100,
    ):
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping <= 0:
            raise ValueError(
                f"damping must be a positive number, got {damping!r}; the proximal term keeps the "
                "PBRF objective well posed, so it cannot be zero"
            )
        if epsilon is not None and (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon == 0):
            raise ValueError(f"epsilon must be None (+1/N) or a non-zero number, got {epsilon!r}")
        self.train = check_data(train, "training data")
        self.task = task
        self.model = copy.deepcopy(model).double()
        self.model.eval()
        self.layers = select_layers(self.model, modules)
        self.space = ParameterSpace(self.model, self.layers)
        self.damping = float(damping)
        self.n = len(self.train)
        self.epsilon = 1.0 / self.n if epsilon is None else float(epsilon)
        self.rtol = rtol
        self.max_iter = max_iter
        self.batch_size = check_int(batch_size, "batch_size")
        self.theta_s = self.space.flatten(self.space.from_params(self.space.params())).clone()
        # Bregman anchors per batch: the trained outputs, the loss there and its output gradient.
        self._batches = []
        with torch.no_grad():
            for _, batch in iter_batches(self.train, task, self.batch_size, "training data"):
                batch = cast_batch(batch, torch.float64)
                y_s = model_output(self.model, task, batch).detach()
                y_leaf = y_s.clone().requires_grad_(True)
                with torch.enable_grad():
                    l_s = output_loss(task, batch, y_leaf)
                    (g_s,) = torch.autograd.grad(l_s, y_leaf)
                self._batches.append((batch, y_s, l_s.detach(), g_s))

    # ------------------------------------------------------------------ objective
    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.space.to_params(self.space.unflatten(theta))

    def _objective(self, theta: torch.Tensor, example: Any) -> torch.Tensor:
        params = self._params(theta)
        breg = theta.new_zeros(())
        for batch, y_s, l_s, g_s in self._batches:
            y = model_output(self.model, self.task, batch, params)
            breg = breg + output_loss(self.task, batch, y) - l_s - (g_s * (y - y_s)).sum()
        loss_m = precise_loss(self.task, _Bound(self.model, params), example)
        prox = 0.5 * self.damping * ((theta - self.theta_s) ** 2).sum()
        return breg / self.n + self.epsilon * loss_m + prox

    def _evaluate(self, theta: torch.Tensor, example: Any, create_graph: bool = False):
        """(leaf, objective value, gradient) at theta; the graph is kept for HVPs if asked."""
        leaf = theta.detach().requires_grad_(True)
        val = self._objective(leaf, example)
        (g,) = torch.autograd.grad(val, leaf, create_graph=create_graph)
        return leaf, float(val.detach()), g

    def response(self, index: int) -> PBRFResponse:
        """Minimise the PBRF objective for training example ``index``, starting at theta_s.

        Line-search Newton-CG: each step solves ``H step = -g`` by conjugate gradients on exact
        Hessian-vector products (double backward through one retained graph) to a relative
        residual of ``CG_TOL``, falling back to steepest descent on negative curvature, then
        backtracks until the objective decreases (Armijo). Near the optimum the value changes
        by less than float64 resolves on a sum over N examples; there a step is accepted when
        it reduces the gradient norm instead.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n:
            raise IndexError(f"index {index!r} is out of range for {self.n} training examples")
        example = cast_batch(self.task.collate([self.train[index]]), torch.float64)
        theta = self.theta_s.clone()
        noise = 1e-13 * (1.0 + sum(abs(float(l_s)) for *_, l_s, _ in self._batches) / self.n)
        with eval_mode(self.model):
            leaf, val, g = self._evaluate(theta, example, create_graph=True)
            g0 = gnorm = float(g.detach().norm())
            it = 0
            while gnorm > self.rtol * g0 and it < self.max_iter:
                it += 1
                step = _conjugate_gradients(_hvp(g, leaf), -g.detach(), CG_TOL, CG_MAX_ITER)
                slope = float(g.detach() @ step)
                if slope >= 0:  # not a descent direction (indefinite H): steepest descent
                    step, slope = -g.detach(), -(gnorm**2)
                t = 1.0
                while True:
                    trial = theta + t * step
                    leaf_t, val_t, g_t = self._evaluate(trial, example, create_graph=True)
                    decrease = val_t <= val + 1e-4 * t * slope
                    flat = abs(val_t - val) <= noise and float(g_t.detach().norm()) < gnorm
                    if decrease or flat or t < 1e-10:
                        break
                    t /= 2
                theta, leaf, val, g, gnorm = trial, leaf_t, val_t, g_t, float(g_t.detach().norm())
        return PBRFResponse(index, theta - self.theta_s, gnorm <= self.rtol * g0, it, gnorm / g0)

    # ------------------------------------------------------------------ scores
    def measurements(self, queries: Any, delta: torch.Tensor | None = None) -> torch.Tensor:
        """f_q at theta_s + delta for every query, [Q] (one forward per query)."""
        theta = self.theta_s if delta is None else self.theta_s + delta
        model = _Bound(self.model, self._params(theta))
        with torch.no_grad():
            return torch.stack(
                [
                    precise_measurement(self.task, model, cast_batch(self.task.collate([q]), torch.float64))
                    for q in queries
                ]
            )

    def scores(self, queries: Any, indices: list[int] | None = None) -> PBRFScores:
        """PBRF scores ``-(f_q(theta(eps)) - f_q(theta_s)) / eps`` for the training ``indices`` (default: all)."""
        queries = check_data(queries, "queries")
        indices = list(range(self.n)) if indices is None else [int(i) for i in indices]
        f_s = self.measurements(queries)
        cols, converged = [], []
        for i in indices:
            r = self.response(i)
            cols.append(-(self.measurements(queries, r.delta) - f_s) / self.epsilon)
            converged.append(r.converged)
        meta = {"damping": self.damping, "epsilon": self.epsilon, "rtol": self.rtol}
        return PBRFScores(torch.stack(cols, dim=1), indices, converged, meta)


def _hvp(g: torch.Tensor, leaf: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hessian-vector products by differentiating the retained gradient graph once more."""
    return lambda v: torch.autograd.grad(g, leaf, grad_outputs=v, retain_graph=True)[0]


def _conjugate_gradients(
    hvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tol: float, max_iter: int
) -> torch.Tensor:
    """Solve H x = b for symmetric H given by products; stops at relative residual ``tol``.

    On a direction of non-positive curvature (possible far from theta_s when eps > 0) it
    returns the iterate so far, or b itself if that happens at once (a gradient step).
    """
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = float(r @ r)
    stop = tol * tol * rr
    for _ in range(max_iter):
        hp = hvp(p)
        curv = float(p @ hp)
        if curv <= 0:
            return x if x.any() else b
        alpha = rr / curv
        x = x + alpha * p
        r = r - alpha * hp
        rr_new = float(r @ r)
        if rr_new <= stop:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


class _Bound:
    """The model with given parameters, callable like the model (for ``task.loss``)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self.model, self.params = model, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.params, args, kwargs)


def pearson_per_query(scores: torch.Tensor, pbrf: PBRFScores) -> Correlation:
    """Per query, the Pearson correlation over the PBRF's training examples between a method's
    scores [Q, N] and the PBRF scores; summarized as mean and 95% t-interval over queries."""
    values = torch.as_tensor(getattr(scores, "values", scores) if not isinstance(scores, torch.Tensor) else scores)
    a = values[:, pbrf.indices].double()
    b = pbrf.values.double()
    if a.shape != b.shape:
        raise ValueError(
            f"scores cover {values.shape[0]} queries but the PBRF scores {b.shape[0]}; score the same queries"
        )
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    r = torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))
    return correlation_summary(r)
