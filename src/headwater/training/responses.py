"""Training-aware responses: what K steps of gradient descent do per eigen-direction of the curvature.

Linearise training around the weights: with a fixed curvature H = G + delta I, K steps of
gradient descent at learning rate eta on ``J + eps L_m`` move the weights by

    d theta / d eps = -sum_{k<K} eta (I - eta H)^k grad L_m  ~  -(I - exp(-t H)) H^-1 grad L_m,   t = eta K

(the continuous-time form; it differs from the discrete sum by O(eta * lambda) relative per
direction, which is small wherever training was stable). In the eigenbasis of G this is one
function of each eigenvalue lambda, so it is a *response* of the curvature operators
(``headwater.curvature.Inverse``), not a new operator:

- ``Unrolled(lr, steps, weight_decay)``: ``(1 - exp(-t x)) / x`` with ``x = lambda + delta``.
  As ``t`` grows it becomes the influence function's ``1 / x``; for small ``t`` it is
  ``t`` (the gradient dot product times ``lr * steps``: TracIn's single-checkpoint term).
- ``Decay(lr, steps, weight_decay)``: ``exp(-t x)``, how a later segment of training shrinks a
  perturbation of the weights made before it (SOURCE carries the query gradient back through it).
- ``PreconditionedUnrolled`` / ``PreconditionedDecay``: the same for a preconditioned optimizer
  (Adam), one layer at a time: each eigen-direction's rate is ``a (lambda + damping) + b``
  (``headwater.training.preconditioner`` says what a and b are and what that approximates).

Damping and weight decay. Both add to every eigenvalue: ``delta = weight_decay + damping``.
Weight decay is the true L2 term of the training objective (its Hessian is ``weight_decay * I``);
damping is what the Attributor adds for stability (``an.damping(...)``: the paper's 0.1 x mean
eigenvalue by default), so the limit ``t -> inf`` is exactly ``Inverse`` at damping
``weight_decay + damping``. ``Unrolled`` needs no damping to be finite (at ``x = 0`` it is ``t``):
with the true weight decay known, pass a small damping (``damping=1e-12``) rather than the paper's.

Units: ``lr`` and ``weight_decay`` are in the units of headwater's G, the Hessian of the *mean
over examples of the task's per-example loss* (a language model's loss summed over its scored
tokens). A training loss that is ``c`` times that (``c = 1 / mean scored tokens`` for the usual
token-mean LM loss) has curvature ``c G``: pass ``lr = c * lr_train`` and
``weight_decay = wd_train / c`` (``headwater.training.Segment`` does this from ``loss_scale``).

Only ``lr * steps`` matters (a learning-rate schedule enters through its sum over the steps,
exactly so for a fixed curvature, since the factors ``exp(-eta_k H)`` commute).
"""

from __future__ import annotations

import torch

from ..curvature import Inverse
from ..validation import check_number

__all__ = ["Unrolled", "Decay", "PreconditionedUnrolled", "PreconditionedDecay", "unrolled_gain"]


def unrolled_gain(x: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 - exp(-t x)) / x`` elementwise, stable everywhere: ``t * phi(t x)`` with ``phi(z) = -expm1(-z) / z``.

    ``expm1`` keeps full relative precision for small ``t x`` (where ``1 - exp`` would cancel),
    and ``phi(0) = 1`` is the limit, so a zero eigenvalue without damping gives exactly ``t``.
    """
    z = x * t
    safe = torch.where(z == 0, torch.ones_like(z), z)
    return torch.where(z == 0, torch.full_like(z, t), -torch.expm1(-safe) / safe * t)


def _check_horizon(lr: float, steps: float, weight_decay: float) -> tuple[float, float, float]:
    lr = check_number(lr, "lr", low=0.0, low_inclusive=False, hint="the learning rate of the training steps")
    steps = check_number(steps, "steps", low=0.0, low_inclusive=False, hint="how many training steps")
    weight_decay = check_number(weight_decay, "weight_decay", hint="the L2 coefficient of the objective, or 0")
    return lr, steps, weight_decay


class Unrolled(Inverse):
    """The response of ``steps`` gradient-descent steps at ``lr``: ``(1 - exp(-lr*steps*x)) / x``, x = lambda + delta.

    ``delta = weight_decay + damping`` (see the module docstring for why they add). Use it as
    ``an.scores(queries, train, response=Unrolled(lr=..., steps=...))``; it applies to every
    curvature with eigenvalues (EK-FAC, K-FAC, diagonal, the index's projected curvature).
    """

    def __init__(self, lr: float, steps: float, weight_decay: float = 0.0):
        self.lr, self.steps, self.weight_decay = _check_horizon(lr, steps, weight_decay)

    @property
    def horizon(self) -> float:
        """``t = lr * steps``, the only combination that matters."""
        return self.lr * self.steps

    def spec(self) -> dict:
        return {"kind": "unrolled", "lr": self.lr, "steps": self.steps, "weight_decay": self.weight_decay}

    def gain(self, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
        """The response of each eigenvalue, in float64."""
        return unrolled_gain(eigenvalues.double() + (self.weight_decay + damping), self.horizon)

    def apply(self, coords: torch.Tensor, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
        return coords * self.gain(eigenvalues, damping).to(coords.dtype)

    def without_curvature(self, v: torch.Tensor) -> torch.Tensor:
        """The response with G = 0 and no damping (the identity strategy): ``t * phi(t * weight_decay) * v``.

        With no weight decay this is exactly ``lr * steps`` times the gradient, so identity
        scores are ``lr * steps`` times the gradient dot products.
        """
        return v * float(unrolled_gain(torch.tensor(self.weight_decay, dtype=torch.float64), self.horizon))

    def __repr__(self) -> str:
        return f"Unrolled(lr={self.lr:g}, steps={self.steps:g}, weight_decay={self.weight_decay:g})"


class Decay(Inverse):
    """How ``steps`` steps at ``lr`` shrink an earlier perturbation: ``exp(-lr*steps*(lambda + delta))``.

    Not a preconditioner for scores on its own: SOURCE applies it to carry the query gradient
    back through the segments of training that came after the one being scored.
    """

    def __init__(self, lr: float, steps: float, weight_decay: float = 0.0):
        self.lr, self.steps, self.weight_decay = _check_horizon(lr, steps, weight_decay)

    @property
    def horizon(self) -> float:
        return self.lr * self.steps

    def spec(self) -> dict:
        return {"kind": "decay", "lr": self.lr, "steps": self.steps, "weight_decay": self.weight_decay}

    def apply(self, coords: torch.Tensor, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
        x = eigenvalues.double() + (self.weight_decay + damping)
        return coords * torch.exp(-self.horizon * x).to(coords.dtype)

    def without_curvature(self, v: torch.Tensor) -> torch.Tensor:
        return v * float(torch.exp(torch.tensor(-self.horizon * self.weight_decay, dtype=torch.float64)))

    def __repr__(self) -> str:
        return f"Decay(lr={self.lr:g}, steps={self.steps:g}, weight_decay={self.weight_decay:g})"


class PreconditionedUnrolled(Inverse):
    """One layer's response to a preconditioned segment: ``a * (1 - exp(-t r)) / r``, ``r = a (lambda + damping) + b``.

    ``scale`` (a) and ``shift`` (b) are laid out like the layer's eigenvalues (None: 1 and 0, which
    is ``Unrolled``). For Adam, a is the preconditioner's diagonal in the eigenbasis and b AdamW's
    decoupled weight decay there (``preconditioner.eigen_diagonal``).
    """

    def __init__(self, horizon: float, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None):
        self.t = check_number(horizon, "horizon", low=0.0, low_inclusive=False)
        self.scale, self.shift = scale, shift

    def spec(self) -> dict:
        return {"kind": "preconditioned-unrolled", "horizon": self.t, "preconditioned": self.scale is not None}

    def rate(self, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
        r = eigenvalues.double() + damping
        if self.scale is not None:
            r = r * self.scale.to(r.device, torch.float64)
        if self.shift is not None:
            r = r + self.shift.to(r.device, torch.float64)
        return r

    def gain(self, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
        g = unrolled_gain(self.rate(eigenvalues, damping), self.t)
        return g if self.scale is None else g * self.scale.to(g.device, torch.float64)

    def apply(self, coords: torch.Tensor, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
        return coords * self.gain(eigenvalues, damping).to(coords.dtype)


class PreconditionedDecay(PreconditionedUnrolled):
    """One layer's decay over a preconditioned segment: ``exp(-t r)``, ``r`` as in ``PreconditionedUnrolled``."""

    def spec(self) -> dict:
        return {"kind": "preconditioned-decay", "horizon": self.t, "preconditioned": self.scale is not None}

    def gain(self, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
        return torch.exp(-self.t * self.rate(eigenvalues, damping))
