"""Curvature operators against dense matrices and closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headwater as hw
from _models import MLP, Conv1DMLP, classification_data, regression_data
from _reference import blocks, dense_gauss_newton
from headwater.curvature import EigenCurvature
from headwater.layers import select_layers


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def test_ekfac_preconditioner_equals_dense_kronecker_in_both_vec_orders():
    o, i, damping = 4, 3, 0.3
    q_s, q_a = _orthogonal(o, 0), _orthogonal(i, 1)
    lam = torch.rand(o, i, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 5
    op = EigenCurvature(q_a, q_s, lam)
    v = torch.randn(o, i, dtype=torch.float64)
    got = op.solve(v, damping)

    # Row-major vec (torch's flatten of [O, I]): vec(S V A) = (S kron A^T) vec(V).
    k = torch.kron(q_s, q_a)
    dense = k @ torch.diag(1.0 / (lam.reshape(-1) + damping)) @ k.T
    torch.testing.assert_close(got.reshape(-1), dense @ v.reshape(-1))
    # Column-major vec (stacking columns, the textbook convention): the basis is Q_A kron Q_S.
    k_col = torch.kron(q_a, q_s)
    dense_col = k_col @ torch.diag(1.0 / (lam.T.reshape(-1) + damping)) @ k_col.T
    torch.testing.assert_close(got.T.reshape(-1), dense_col @ v.T.reshape(-1))
    # to_dense is the operator G itself, in row-major order.
    torch.testing.assert_close(op.to_dense(), k @ torch.diag(lam.reshape(-1)) @ k.T)
    # Batched inputs [..., O, I] are preconditioned independently.
    vb = torch.randn(5, o, i, dtype=torch.float64)
    torch.testing.assert_close(op.solve(vb, damping)[3], op.solve(vb[3], damping))


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_single_linear_layer_matches_exact_gauss_newton_and_closed_form(strategy):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    train = regression_data(30, d_in=4, d_out=3)
    queries = regression_data(5, d_in=4, d_out=3, seed=9)
    an = hw.Attributor(model, task=hw.RegressionTask(), strategy=strategy, fisher="exact").fit(train, batch_size=7)

    # With squared error the Gauss-Newton is A kron I (column-major) = I kron A (row-major).
    x = torch.stack([x for x, _ in train])
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # bias column
    a = xt.T @ xt / len(x)
    g_exact = torch.kron(torch.eye(3, dtype=torch.float64), a)
    torch.testing.assert_close(an.curvature[""].to_dense(), g_exact)

    # Closed form: (G + l I)^-1 vec(r x^T) = vec(r x^T (A + l I)^-1), so
    # score(q, m) = (r_q . r_m) * x_q^T (A + l I)^-1 x_m.
    damping = 0.05
    res = an.scores(queries, train, batch_size=4, damping=damping)

    def resid(data):
        xs = torch.stack([x for x, _ in data])
        ys = torch.stack([y for _, y in data])
        return torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1), model(xs).detach() - ys

    xq, rq = resid(queries)
    xm, rm = resid(train)
    closed = (rq @ rm.T) * (xq @ torch.linalg.solve(a + damping * torch.eye(5, dtype=a.dtype), xm.T))
    torch.testing.assert_close(res.values, closed)


def test_exactly_kronecker_g_gives_lambda_equal_to_kronecker_eigenvalues():
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    train = regression_data(40, d_in=3, d_out=2)
    kfac = hw.Attributor(model, task=hw.RegressionTask(), strategy="kfac", fisher="exact").fit(train)
    ekfac = hw.Attributor(model, task=hw.RegressionTask(), strategy="ekfac", fisher="exact").fit(train)
    # Same eigenbasis; Lambda = eig(S) outer eig(A), with S = I here.
    torch.testing.assert_close(ekfac.curvature[""].lam, kfac.curvature[""].lam)
    x = torch.stack([x for x, _ in train])
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    eig_a = torch.linalg.eigvalsh(xt.T @ xt / len(x))
    torch.testing.assert_close(ekfac.curvature[""].lam, torch.outer(torch.ones(2, dtype=x.dtype), eig_a))


@pytest.mark.parametrize("make", [MLP, Conv1DMLP], ids=["linear", "conv1d"])
def test_ekfac_is_at_least_as_close_to_dense_gauss_newton_as_kfac(make):
    model = make(d_in=4, hidden=5, d_out=3).double()
    train = classification_data(60, d_in=4, classes=3)
    layers = select_layers(model, None)
    dense = blocks(dense_gauss_newton(model, layers, torch.stack([x for x, _ in train]), "ce"), layers)
    kfac = hw.Attributor(model, task=hw.ClassificationTask(), strategy="kfac", fisher="exact").fit(train, batch_size=16)
    ekfac = hw.Attributor(model, task=hw.ClassificationTask(), strategy="ekfac", fisher="exact").fit(
        train, batch_size=16
    )
    for name in layers:
        err_k = torch.linalg.norm(kfac.curvature[name].to_dense() - dense[name])
        err_e = torch.linalg.norm(ekfac.curvature[name].to_dense() - dense[name])
        assert err_e <= err_k + 1e-12, (name, err_e, err_k)
        # EK-FAC's Lambda is the exact diagonal of G in the K-FAC eigenbasis.
        op = ekfac.curvature[name]
        k = torch.kron(op.q_s, op.q_a)
        torch.testing.assert_close(torch.diag(k.T @ dense[name] @ k), op.lam.reshape(-1))


def test_diagonal_equals_diagonal_of_dense_gauss_newton():
    model = MLP(d_in=4, hidden=5, d_out=3).double()
    train = classification_data(40, d_in=4, classes=3)
    layers = select_layers(model, None)
    dense = blocks(dense_gauss_newton(model, layers, torch.stack([x for x, _ in train]), "ce"), layers)
    an = hw.Attributor(model, task=hw.ClassificationTask(), strategy="diagonal", fisher="exact").fit(train)
    for name in layers:
        torch.testing.assert_close(an.curvature[name].diag.reshape(-1), torch.diag(dense[name]))


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_large_damping_times_score_tends_to_gradient_dot_product(strategy):
    model = MLP().double()
    train = classification_data(20)
    queries = classification_data(3, seed=7)
    task = hw.ClassificationTask()
    dots = hw.Attributor(model, task=task, strategy="identity").scores(queries, train).values
    an = hw.Attributor(model, task=task, strategy=strategy).fit(train)
    errors = []
    for damping in (1e2, 1e4, 1e6):
        approx = damping * an.scores(queries, train, damping=damping).values
        errors.append(((approx - dots).norm() / dots.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


def test_sampled_fisher_converges_to_exact_fisher():
    """The sampled estimate is unbiased: over many examples it approaches the exact one."""
    model = MLP(d_in=3, hidden=4, d_out=3).double()
    x = torch.randn(3000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    train = [(xi, torch.tensor(0)) for xi in x]
    task = hw.ClassificationTask()
    exact = hw.Attributor(model, task=task, strategy="kfac", fisher="exact").fit(train, batch_size=500)
    sampled = hw.Attributor(model, task=task, strategy="kfac", fisher="sampled").fit(train, batch_size=500)
    for name in exact.layers:
        ge, gs = exact.curvature[name].to_dense(), sampled.curvature[name].to_dense()
        assert (gs - ge).norm() / ge.norm() < 0.1
