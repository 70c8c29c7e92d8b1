"""Refinement: PCG with EK-FAC as preconditioner converges to the dense damped Gauss-Newton solve.

The reference is ``tests/_reference``: dense G from jacrev/hessian and per-example gradients
from ``loss.backward()``, solved with ``torch.linalg.solve``.
"""

from __future__ import annotations

import pytest
import torch

import headwater as hw
from _models import MLP, classification_data
from _reference import autograd_grads, blocks, dense_gauss_newton
from headwater.refine import refine

DAMPING = 0.01


@pytest.fixture(scope="module")
def case():
    """A tiny classifier, EK-FAC fitted with the sampled Fisher (so it is only a preconditioner)."""
    model, train, queries = MLP().double(), classification_data(30), classification_data(4, seed=7)
    an = hw.Attributor(model, task=hw.ClassificationTask(), seed=0).fit(train, batch_size=10)
    x = torch.stack([x for x, _ in train])
    g = dense_gauss_newton(model, an.layers, x, "ce")  # [P, P]
    gq = autograd_grads(model, an.task, queries, an.layers, measurement=True)  # [Q, P]
    gt = autograd_grads(model, an.task, train, an.layers)  # [N, P]
    return an, train, queries, g, gq, gt


def _flat(an, per_layer):
    return torch.cat([per_layer[n].flatten(1) for n in an.layers], dim=1)


def test_zero_steps_is_plain_ekfac(case):
    an, train, queries, *_ = case
    plain = an.query_gradients(queries, damping=DAMPING)
    grads = {n: q.full for n, q in an.query_gradients(queries, damping=0.0).items()}  # solve with 0 damping
    raw = hw.Attributor(an.model, task=an.task, strategy="identity").query_gradients(queries)
    out = refine(
        an.model,
        an.task,
        an.layers,
        an.curvature,
        an.damping(DAMPING),
        {n: q.full for n, q in raw.items()},
        train,
        steps=0,
    )
    for n in an.layers:
        torch.testing.assert_close(out.solution[n], plain[n].full, rtol=0, atol=0)
        assert not torch.equal(grads[n], plain[n].full)  # damping reaches the preconditioner
    torch.testing.assert_close(
        an.scores(queries, train, damping=DAMPING, refine_steps=0).values,
        an.scores(queries, train, damping=DAMPING).values,
    )


def test_refinement_converges_to_the_dense_damped_gauss_newton(case):
    an, train, queries, g, gq, gt = case
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    exact = torch.linalg.solve(g + DAMPING * eye, gq.T).T  # [Q, P]
    errors = []
    for steps in (0, 3, 30):
        p = _flat(
            an,
            {
                n: q.full
                for n, q in an.query_gradients(queries, damping=DAMPING, refine_steps=steps, refine_data=train).items()
            },
        )
        errors.append(((p - exact).norm() / exact.norm()).item())
    assert errors[0] > 0.05  # EK-FAC with a sampled Fisher is only an approximation here
    assert errors[1] < errors[0] / 2
    assert errors[2] < 1e-6
    scores = an.scores(queries, train, damping=DAMPING, refine_steps=30).values
    expected = exact @ gt.T  # the solve is accurate normwise (< 1e-6), so compare on the scores' scale
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_layer_blocks_converge_to_the_block_diagonal_solve(case):
    an, train, queries, g, gq, _ = case
    lo, parts = 0, []
    for block in blocks(g, an.layers).values():
        size = block.shape[0]
        eye = torch.eye(size, dtype=g.dtype)
        parts.append(torch.linalg.solve(block + DAMPING * eye, gq[:, lo : lo + size].T).T)
        lo += size
    exact = torch.cat(parts, dim=1)
    q = an.query_gradients(queries, damping=DAMPING, refine_steps=30, refine_data=train, refine_blocks="layer")
    torch.testing.assert_close(_flat(an, {n: v.full for n, v in q.items()}), exact, rtol=1e-8, atol=1e-10)


def test_residuals_shrink_and_start_at_ekfac(case):
    an, train, queries, *_ = case
    raw = hw.Attributor(an.model, task=an.task, strategy="identity").query_gradients(queries)
    out = refine(
        an.model,
        an.task,
        an.layers,
        an.curvature,
        an.damping(DAMPING),
        {n: q.full for n, q in raw.items()},
        train,
        steps=5,
    )
    assert len(out.residuals) == 6
    assert (out.residuals[-1] < out.residuals[0] / 10).all()


def test_bad_refine_arguments_raise_clear_errors(case):
    an, train, queries, *_ = case
    with pytest.raises(ValueError, match="refine_steps must be a non-negative integer, got -1"):
        an.scores(queries, train, refine_steps=-1)
    with pytest.raises(ValueError, match="refine_blocks='diag' is unknown"):
        an.scores(queries, train, refine_steps=1, refine_blocks="diag")
    with pytest.raises(ValueError, match="refine_steps=2 needs refine_data"):
        an.query_gradients(queries, refine_steps=2)
    with pytest.raises(ValueError, match="cannot be combined with candidates="):
        an.scores(queries, train, refine_steps=1, candidates=3)
