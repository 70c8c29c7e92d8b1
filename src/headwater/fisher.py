"""Fisher estimators: the pseudo-losses whose gradients' outer products estimate G.

The Gauss-Newton matrix of a sequence is ``G = J^T H J`` with H the Hessian of the loss in the
model's outputs. Every estimator here turns one forward pass into pseudo-losses whose output
gradients ``u`` satisfy ``E[u u^T] = H`` (per scored position), so the captured ``(a, g)``
estimate G without bias:

- "empirical": the training loss on the data's own labels (deterministic; H only approximately).
- "sampled": one label per position drawn from the model (the paper's choice); through the
  task's ``sampled_losses`` (k draws from one forward pass for the built-in tasks).
- "topk": the ``top`` likeliest labels exactly plus one draw from the rest, under random signs,
  summed into one backward pass (``topk_tail``); the built-in tasks' default.
- "importance": one label drawn in proportion to its share of tr(H), reweighted.
- "exact": the square roots of H, one backward pass per output (``softmax_gn_losses``).

They work from a task's ``scored_outputs`` (``Task.likelihood`` says which H); a custom task may
implement ``topk_losses`` / ``importance_losses`` / ``gauss_newton_losses`` itself instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NonFiniteError, all_finite
from .task import Task, inverse_cdf, label_losses

__all__ = [
    "FISHERS",
    "DEFAULT_TOP",
    "resolve_fisher",
    "pseudo_losses",
    "topk_tail",
    "importance_labels",
    "softmax_gn_losses",
    "rademacher",
]

FISHERS = ("auto", "topk", "importance", "sampled", "empirical", "exact")
DEFAULT_TOP = 8


def _builtin_outputs(task: Task) -> bool:
    """Whether the estimators may work from the task's ``scored_outputs``.

    The class that implements ``scored_outputs`` must also be the one whose ``loss`` the task
    uses: a subclass that replaces ``loss`` (other labels, another objective) keeps sampling
    through its own ``loss(sample=True)``.
    """
    kind = type(task)
    owner = next((c for c in kind.__mro__ if "scored_outputs" in vars(c)), Task)
    return owner is not Task and task.likelihood is not None and kind.loss is owner.loss


def _own(task: Task, method: str) -> bool:
    """Whether the task's class (not the base ``Task``) implements an estimator hook itself."""
    return any(method in vars(c) for c in type(task).__mro__ if c is not Task)


def resolve_fisher(task: Task, fisher: str) -> str:
    """``"auto"`` -> ``"topk"`` when the task supports it on its own loss, else ``"sampled"``."""
    if fisher != "auto":
        return fisher
    return "topk" if _own(task, "topk_losses") or _builtin_outputs(task) else "sampled"


def _needs(task: Task, fisher: str, method: str) -> NotImplementedError:
    return NotImplementedError(
        f"fisher={fisher!r} needs {type(task).__name__}.{method}() or {type(task).__name__}.scored_outputs() "
        "with a likelihood; use fisher='sampled' or implement one of them"
    )


def pseudo_losses(
    task: Task, model: nn.Module, batch: Any, fisher: str, samples: int = 1, top: int = DEFAULT_TOP
) -> list[torch.Tensor]:
    """The pseudo-losses of one batch for ``fisher`` (resolved, not "auto"), all from one forward pass."""
    if fisher == "empirical":
        return [task.loss(model, batch, sample=False)]
    if fisher == "sampled":
        return task.sampled_losses(model, batch, samples)
    if fisher == "topk":
        if _own(task, "topk_losses"):
            return task.topk_losses(model, batch, samples, top)
        if not _builtin_outputs(task):
            raise _needs(task, fisher, "topk_losses")
        out = task.scored_outputs(model, batch)
        return _gaussian_signed(out, samples) if task.likelihood == "gaussian" else _topk_losses(out, samples, top)
    if fisher == "importance":
        if _own(task, "importance_losses"):
            return task.importance_losses(model, batch, samples)
        if not _builtin_outputs(task) or task.likelihood != "categorical":
            raise _needs(task, fisher, "importance_losses")
        return _importance_losses(task.scored_outputs(model, batch), samples)
    if fisher == "exact":
        if _own(task, "gauss_newton_losses"):
            return list(task.gauss_newton_losses(model, batch))
        if not _builtin_outputs(task) or not task.exact_fisher:
            raise _needs(task, fisher, "gauss_newton_losses")
        out = task.scored_outputs(model, batch)
        if task.likelihood == "gaussian":
            flat = out.reshape(out.shape[0], -1)
            return [flat[:, k].sum() for k in range(flat.shape[1])]
        return list(softmax_gn_losses(out))
    raise ValueError(f"fisher={fisher!r} is unknown; choose one of {FISHERS}")


def _gaussian_signed(pred: torch.Tensor, samples: int) -> list[torch.Tensor]:
    """Squared error: every output coordinate exactly, with a random sign each, summed (one backward).

    H = I has no tail to sample: the square-root factors are the coordinates themselves, and
    ``sum_d s_d pred_d`` with Rademacher s_d has E[s s^T] = I. For one output per example the
    signs square away and this *is* the exact Gauss-Newton. ``top`` has nothing to select.
    """
    return [(pred * rademacher(pred.detach())).sum() * samples**-0.5 for _ in range(samples)]


def rademacher(like: torch.Tensor) -> torch.Tensor:
    """Independent +-1 signs shaped like ``like``, from torch's global RNG (seeded per batch)."""
    return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1


def topk_tail(p: torch.Tensor, top: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and signed weights [k, M, J] of the top-m-plus-tail estimator of H = diag(p) - p p^T.

    With v_c = e_c - p, ``H = sum_c p_c v_c v_c^T``. For a peaked p almost all of that mass is
    in a few classes, and plain sampling spends its draws re-drawing them while the rare draw
    of a tail class, whose v_c is large, decides the estimate. Here the top m = ``top``
    classes enter exactly (weight sqrt(p_c)), and one label y drawn from the renormalized tail
    enters with weight sqrt(r), r = the tail mass: ``sum_top p_c v_c v_c^T + r v_y v_y^T`` is
    unbiased for H, and the tail's share r enters every time instead of by luck of the draw.
    With m >= C every class enters exactly and nothing is drawn (J = C, else J = m + 1).

    Why random signs: the J slots are summed into *one* pseudo-loss (one backward pass), and a
    pseudo-loss also sums over the tokens of a sequence, so the gradient's outer product holds
    cross products between slots and between tokens. A sampled v_y has mean zero, which kills
    them in expectation; a deterministic sqrt(p_c) v_c does not. An independent Rademacher sign
    per token and slot restores E[cross terms] = 0, so both the covariances and EK-FAC's
    Lambda stay unbiased; what is left of the cross terms is zero-mean noise that averages over
    tokens, instead of the all-or-nothing draw of a rare label.

    ``p``: probabilities [M, C], overwritten (the tail's CDF is built in place: on a
    vocabulary-sized p a copy costs as much as the rest); k = ``samples`` independent draws.
    """
    c = p.shape[-1]
    m = min(top, c)
    top_p, top_i = p.topk(m, dim=-1)  # [M, m]
    labels = top_i.expand(samples, *top_i.shape)
    weights = top_p.sqrt().expand(samples, *top_p.shape)
    if m < c:
        cdf = torch.cumsum(p.scatter_(-1, top_i, 0.0), dim=-1, out=p)  # the tail's CDF
        mass = cdf[:, -1:]
        u = torch.rand(samples, *mass.shape, device=p.device, dtype=p.dtype) * mass  # [k, M, 1]
        drawn = torch.searchsorted(cdf.expand(samples, *cdf.shape), u).clamp_(max=c - 1)
        labels = torch.cat([labels, drawn], dim=-1)
        weights = torch.cat([weights, mass.sqrt().expand(samples, *mass.shape)], dim=-1)
    return labels, weights * rademacher(weights)


def _checked_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 or wider, after one cheap check that no output is NaN or inf."""
    if not all_finite(logits):
        raise NonFiniteError(
            "the model's outputs contain NaN or inf, so no Fisher can be estimated from them; "
            "check the weights and inputs, or run in float32"
        )
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _topk_losses(logits: torch.Tensor, samples: int, top: int) -> list[torch.Tensor]:
    """``samples`` pseudo-losses of the signed top-m-plus-tail estimator, from logits [M, C].

    Each is ``-sum_t sum_j w_tj log p_t(y_tj)`` over every slot of ``topk_tail`` (fresh signs
    and tail draws per pseudo-loss), scaled by 1/sqrt(samples) so their outer products average.
    """
    log_probs = _checked_log_probs(logits)
    with torch.no_grad():
        labels, weights = topk_tail(log_probs.detach().exp(), top, samples)  # [k, M, J]
    return [-(log_probs.gather(-1, y) * w).sum() * samples**-0.5 for y, w in zip(labels, weights)]


def importance_labels(p: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and signed weights [M, k] drawn in proportion to each label's share of tr(H).

    With v_c = e_c - p, ``H = sum_c p_c v_c v_c^T`` and ``tr H = sum_c p_c |v_c|^2 = 1 - |p|^2``.
    Plain sampling draws c with probability p_c, so for a peaked p the rare tail labels, whose
    |v_c|^2 ~ 1 dwarfs the top label's ~(1 - p_top)^2, decide the estimate by luck. Drawing
    instead from ``q_c = p_c |v_c|^2 / tr H`` with weight ``sqrt(p_c / q_c)`` keeps E[w^2 v v^T] = H
    and makes ``|w v|^2 = tr H`` the same for every draw: the magnitude, the part that swings
    Lambda's mean and the damping, no longer depends on the seed; only the direction does.

    The weighted v has a nonzero mean, so a random sign per token and draw restores
    E[cross-token terms] = 0 for multi-token sequences (as a plain draw has by itself).
    ``p``: probabilities [M, C].
    """
    p2 = p.pow(2).sum(-1, keepdim=True)  # |p|^2
    trace = (1 - p2).clamp_min(0)
    share = p * (1 - 2 * p + p2)  # p_c |v_c|^2 >= 0 up to rounding
    labels = inverse_cdf(share.clamp_min(0), samples)  # [M, k]
    v2 = (1 - 2 * p.gather(-1, labels) + p2).clamp_min(torch.finfo(p.dtype).tiny)  # |v_y|^2
    w = (trace / v2).sqrt() * samples**-0.5
    return labels, w * rademacher(w)


def _importance_losses(logits: torch.Tensor, samples: int) -> list[torch.Tensor]:
    """``samples`` pseudo-losses of ``importance_labels`` (one draw per token each)."""
    log_probs = _checked_log_probs(logits)
    with torch.no_grad():
        labels, weights = importance_labels(log_probs.detach().exp(), samples)
    return label_losses(log_probs, labels, weights)


def softmax_gn_losses(logits: torch.Tensor) -> Iterator[torch.Tensor]:
    """Pseudo-losses whose output gradients are sqrt(p_k)(e_k - p), k = 1..C (rows of logits).

    Their outer products sum to the softmax cross-entropy Hessian diag(p) - p p^T exactly.
    """
    p = torch.softmax(logits.detach().double(), dim=-1)
    for k in range(logits.shape[-1]):
        e_k = torch.zeros_like(p)
        e_k[..., k] = 1.0
        coef = (p[..., k : k + 1].sqrt() * (e_k - p)).to(logits.dtype)
        yield (logits * coef).sum()
