"""Iterative refinement: from EK-FAC's preconditioned gradients toward the exact damped Gauss-Newton.

EK-FAC approximates ``(G + lambda I)^-1 grad f_q`` with a block-diagonal, eigenvalue-corrected
Kronecker G. ASTRA (Wang, Bae, Grosse et al. 2025) uses that approximation as the
*preconditioner* of an iterative solver against the real G instead of as the answer. Here::

    (G + D) X = B          B [Q, P]: every query's gradient, one matrix right-hand side
                           D: each tracked layer's damping lambda_l on its own coordinates

is solved by preconditioned conjugate gradients (PCG), one independent CG per query but
vectorized over the Q columns, with:

- preconditioner ``M^-1 = (G_EKFAC + D)^-1``: the fitted curvature's ``solve``;
- start ``X_0 = M^-1 B``: zero steps return plain EK-FAC, exactly;
- products ``G V = (1/N) sum_m J_m^T H_m J_m V`` over the fit data, from forward- and
  reverse-mode autodiff through the model restricted to the tracked layers' weights
  (``headwater.gauss_newton.gauss_newton_product``: ``torch.func`` jvp/vjp, vmapped
  over the Q vectors). ``blocks="full"`` keeps the cross-layer terms of G; ``blocks="layer"``
  solves each layer's diagonal block, the system EK-FAC itself approximates.

Cost: n steps take n + 1 passes over the fit data (the first computes the starting residual),
each about (1 forward + 1 jvp + 1 vjp) x Q. PCG with a good preconditioner converges in a
handful of steps (its error shrinks with the condition number of M^-1 (G + D), not of G).

Example::

    res = an.scores(queries, train, refine_steps=5)               # via the Attributor
    out = refine(model, task, an.layers, an.curvature, an.damping(), grads, train, steps=5)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from .adapters import LayerAdapter
from .curvature import LayerCurvature
from .data import iter_batches
from .engine import eval_mode, is_sharded
from .task import Task
from .validation import check_choice, check_int

__all__ = ["BLOCKS", "Refined", "refine", "check_refine", "refined_query_gradients"]

BLOCKS = ("full", "layer")


class Refined(NamedTuple):
    """The refined ``(G + D)^-1 B`` per layer [Q, O, I] and the relative residual after each step.

    residuals[k] [Q] = ||B - (G + D) X_k|| / ||B|| per query; residuals[0] is EK-FAC's.
    """

    solution: dict[str, torch.Tensor]
    residuals: list[torch.Tensor]


def check_refine(steps: Any, blocks: Any, model: nn.Module | None = None) -> tuple[int, str]:
    """Validate ``refine_steps`` and ``refine_blocks`` at the public boundary.

    Refinement differentiates through the model's plain parameters (``torch.func``), which a
    sharded (FSDP) model does not have.
    """
    steps, blocks = check_int(steps, "refine_steps", low=0), check_choice(blocks, "refine_blocks", BLOCKS)
    if steps and model is not None and is_sharded(model):
        raise ValueError(
            "refine_steps needs the model's plain parameters for its exact Gauss-Newton products, "
            "but this model is sharded (FSDP); refine on an unsharded copy, or use refine_steps=0"
        )
    return steps, blocks


def refined_query_gradients(
    an: Any,
    grads: dict[str, torch.Tensor],
    damping: dict[str, float],
    data: Any,
    steps: int,
    blocks: str,
    batch_size: int,
    rank: int | None,
) -> dict[str, Any]:
    """An Attributor's raw query gradients, refined by ``steps`` PCG steps and truncated to ``rank``."""
    from .scoring import QueryGradients

    with eval_mode(an.model):
        p = refine(an.model, an.task, an.layers, an.curvature, damping, grads, data, steps, batch_size, blocks).solution
    return {n: QueryGradients.build(p[n].to(grads[n].dtype), rank) for n in an.layers}


def refine(
    model: nn.Module,
    task: Task,
    layers: dict[str, LayerAdapter],
    curvature: dict[str, LayerCurvature],
    damping: dict[str, float],
    grads: dict[str, torch.Tensor],
    data: Any,
    steps: int,
    batch_size: int = 8,
    blocks: str = "full",
    chunk: int = 32,
) -> Refined:
    """``steps`` PCG iterations on ``(G + D) X = B`` from ``X_0 = M^-1 B`` (see the module docstring).

    grads: raw query gradients [Q, O, I] per layer (B). G is the per-example mean Gauss-Newton
    over ``data``. ``chunk`` caps how many vectors one vmapped product carries (memory).
    """
    from .gauss_newton import ParameterSpace, differentiable_attention, eval_mode

    steps, blocks = check_refine(steps, blocks)
    space = ParameterSpace(model, layers)
    names = list(layers)

    def precondition(r: torch.Tensor) -> torch.Tensor:  # M^-1 R, [Q, P] -> [Q, P]
        parts = space.unflatten(r)
        return space.flatten({n: curvature[n].solve(parts[n], damping[n]) for n in names})

    def damped(v: torch.Tensor) -> torch.Tensor:  # D V: each layer's coordinates times its lambda
        lam = torch.cat([torch.full((space.sizes[n],), float(damping[n]), dtype=v.dtype) for n in names])
        return v * lam.to(v.device)

    b = space.flatten({n: grads[n].double() for n in names})  # [Q, P]
    x = precondition(b)
    if steps == 0:
        return Refined(space.unflatten(x), [])
    product = _gn_product(model, task, space, data, batch_size, blocks, chunk)
    with eval_mode(model), differentiable_attention(model):
        r = b - product(x) - damped(x)
        b_norm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        residuals = [r.norm(dim=1) / b_norm]
        z = precondition(r)
        p = z
        rz = (r * z).sum(1, keepdim=True)  # [Q, 1]
        for _ in range(steps):
            ap = product(p) + damped(p)
            pap = (p * ap).sum(1, keepdim=True)
            alpha = torch.where(pap > 0, rz / pap.clamp_min(torch.finfo(pap.dtype).tiny), torch.zeros_like(pap))
            x = x + alpha * p
            r = r - alpha * ap
            residuals.append(r.norm(dim=1) / b_norm)
            z = precondition(r)
            rz_next = (r * z).sum(1, keepdim=True)
            beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(rz.dtype).tiny), torch.zeros_like(rz))
            p, rz = z + beta * p, rz_next
    return Refined(space.unflatten(x), residuals)


def _gn_product(
    model: nn.Module, task: Task, space: Any, data: Any, batch_size: int, blocks: str, chunk: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """V [K, P] -> G V [K, P] (float64), G the per-example mean over ``data``; one pass per call.

    With ``blocks="layer"`` each layer's slice of V is multiplied by that layer's diagonal block
    only: the K vectors are split into L zero-padded copies, one per layer, and each copy keeps
    only its own layer's part of the product (L x the work, no cross-layer coupling).
    """
    from .gauss_newton import gauss_newton_product

    n = len(data)
    bounds, lo = [], 0
    for name in space.layers:
        bounds.append((lo, lo + space.sizes[name]))
        lo += space.sizes[name]
    device = next(model.parameters()).device

    def apply(v: torch.Tensor) -> torch.Tensor:
        if blocks == "layer":  # [K, P] -> [L*K, P], copy l zero outside layer l
            v = torch.cat(
                [torch.zeros_like(v).index_copy_(1, torch.arange(a, e, device=v.device), v[:, a:e]) for a, e in bounds]
            )
        out = torch.zeros_like(v)
        for _, batch in iter_batches(data, task, batch_size, "refinement data"):
            batch = task.to_device(batch, device)
            for c in range(0, v.shape[0], chunk):
                part = space.unflatten(v[c : c + chunk].to(device))
                out[c : c + chunk] += space.flatten(gauss_newton_product(model, task, space, batch, part)).to(out)
        out /= n
        if blocks == "layer":
            k = out.shape[0] // len(bounds)
            out = torch.cat([out[i * k : (i + 1) * k, a:e] for i, (a, e) in enumerate(bounds)], dim=1)
        return out

    return apply
