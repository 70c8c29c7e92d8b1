"""headwater.evaluate against independent exact references.

- LDS: ridge regression retrained in closed form, scored with the exact Hessian inverse.
- PBRF: a tiny MLP whose dense Gauss-Newton matrix is built from autograd Jacobians and the
  softmax Hessian written out by hand.
- LiSSA: the same dense matrix, solved with torch.linalg.solve.
- Retrieval: ranks worked out by sorting in the test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import headwater as hw
from headwater.evaluate import (
    PBRF,
    LiSSA,
    lds,
    pearson_per_query,
    relevant_from_labels,
    retrain_measurements,
    retrieval,
    sample_subsets,
)
from headwater.gauss_newton import ParameterSpace, dense_gauss_newton, layer_gradients
from headwater.layers import select_layers

# torch.func's forward-mode decompositions call the deprecated torch.jit.script internally
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# ---------------------------------------------------------------------------------------
# Tiny problems and their dense ground truth
# ---------------------------------------------------------------------------------------


def _ridge_problem(n: int = 80, d: int = 6, q: int = 12, reg: float = 0.05):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + q, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n + q, generator=gen, dtype=torch.float64)
    return x[:n], y[:n], x[n:], y[n:], reg


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, reg: float) -> torch.Tensor:
    """argmin (1/n) sum 1/2 (x.w - y)^2 + reg/2 ||w||^2, in closed form."""
    n, d = x.shape
    return torch.linalg.solve(x.T @ x / n + reg * torch.eye(d, dtype=x.dtype), x.T @ y / n)


def _tiny_mlp(n: int = 24, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, [(x[i], y[i]) for i in range(n)], x


def _dense_gn(model: nn.Module, space: ParameterSpace, x: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n from autograd Jacobians, independent of the code under test."""
    from torch.func import functional_call

    flat = space.flatten(space.from_params(space.params()))
    f = lambda v: functional_call(model, space.to_params(space.unflatten(v)), (x,))  # noqa: E731
    jac = torch.autograd.functional.jacobian(f, flat)  # [N, C, P]
    p = torch.softmax(f(flat), -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h, jac) / x.shape[0]


# ---------------------------------------------------------------------------------------
# LDS
# ---------------------------------------------------------------------------------------


def test_lds_of_exact_influence_on_ridge_regression_exceeds_0_9(tmp_path):
    x, y, xq, yq, reg = _ridge_problem()
    n, d = x.shape
    w = _ridge_fit(x, y, reg)
    hess = x.T @ x / n + reg * torch.eye(d, dtype=torch.float64)  # exact Hessian of the mean objective
    grad_train = (x @ w - y)[:, None] * x  # grad of 1/2 (x.w - y)^2, [N, d]
    grad_query = (xq @ w - yq)[:, None] * xq
    scores = grad_query @ torch.linalg.solve(hess, grad_train.T)  # [Q, N]

    def retrain(subset: torch.Tensor, seed: int) -> torch.Tensor:
        ws = _ridge_fit(x[subset], y[subset], reg)
        return 0.5 * (xq @ ws - yq) ** 2

    subsets = sample_subsets(n, num_subsets=60, alpha=0.5, seed=0)
    meas = retrain_measurements(retrain, subsets, seeds=1, cache_dir=tmp_path / "cache")
    res = lds(scores, subsets, meas)
    assert res.mean > 0.9, res
    assert res.low <= res.mean <= res.high
    # flipping the sign convention must flip the LDS: the prediction is -sum of scores
    assert lds(-scores, subsets, meas).mean < -0.9

    # headwater's EK-FAC on the same linear model is exact (one output, exact Fisher, damping = reg)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    train = [(x[i], y[i : i + 1]) for i in range(n)]
    queries = [(xq[i], yq[i : i + 1]) for i in range(len(xq))]
    an = hw.Attributor(model, task=hw.RegressionTask(), strategy="ekfac", fisher="exact").fit(train, 16)
    engine = an.scores(queries, train, 16, damping=reg).values.double()
    torch.testing.assert_close(engine, scores, rtol=1e-4, atol=1e-6)


def _counting(retrain, fail_after: int | None = None):
    calls = []

    def fn(subset: torch.Tensor, seed: int) -> torch.Tensor:
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("simulated interruption")
        calls.append((subset.tolist(), seed))
        return retrain(subset, seed)

    return fn, calls


def test_interrupted_lds_run_resumes_with_identical_results(tmp_path):
    x, y, xq, yq, reg = _ridge_problem(n=40, q=5)

    def retrain(subset: torch.Tensor, seed: int) -> torch.Tensor:  # seed-dependent, like real retraining
        noise = 1e-3 * torch.randn(len(xq), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return 0.5 * (xq @ _ridge_fit(x[subset], y[subset], reg) - yq) ** 2 + noise

    subsets = sample_subsets(40, num_subsets=6, alpha=0.5, seed=3)
    full = retrain_measurements(retrain, subsets, seeds=2, cache_dir=tmp_path / "a")

    failing, _ = _counting(retrain, fail_after=7)
    with pytest.raises(KeyboardInterrupt):
        retrain_measurements(failing, subsets, seeds=2, cache_dir=tmp_path / "b")
    resumed_fn, calls = _counting(retrain)
    resumed = retrain_measurements(resumed_fn, subsets, seeds=2, cache_dir=tmp_path / "b")
    assert len(calls) == 12 - 7  # only the pairs the interrupted run had not finished
    assert torch.equal(resumed, full)
    assert not list((tmp_path / "b").glob("*.part"))  # no half-written files left behind

    again_fn, calls = _counting(retrain)
    retrain_measurements(again_fn, subsets, seeds=2, cache_dir=tmp_path / "b")
    assert calls == []

    other = sample_subsets(40, num_subsets=6, alpha=0.5, seed=4)
    with pytest.raises(ValueError, match="holds another subset"):
        retrain_measurements(retrain, other, seeds=2, cache_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="use a new cache_dir"):
        retrain_measurements(retrain, subsets, seeds=2, cache_dir=tmp_path / "b", tag={"task": "other"})


def test_sample_subsets_are_seeded_sorted_and_of_size_alpha_n():
    a = sample_subsets(10, num_subsets=5, alpha=0.3, seed=1)
    assert a.shape == (5, 3)
    assert torch.equal(a, sample_subsets(10, num_subsets=5, alpha=0.3, seed=1))
    assert torch.equal(a, a.sort(dim=1).values)
    assert all(len(set(r.tolist())) == 3 for r in a)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 1}, "n must be an integer"),
        ({"n": 10, "num_subsets": 2}, "num_subsets must be"),
        ({"n": 10, "alpha": 1.0}, "alpha must be a fraction"),
        ({"n": 3, "alpha": 0.1}, "gives subsets of 0"),
    ],
)
def test_sample_subsets_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_subsets(**kwargs)


def test_retrain_measurements_validates_what_retrain_returns():
    subsets = sample_subsets(10, num_subsets=3)
    with pytest.raises(ValueError, match="one measurement per query"):
        retrain_measurements(lambda s, k: torch.zeros(2, 2), subsets, seeds=1)
    with pytest.raises(ValueError, match="non-finite"):
        retrain_measurements(lambda s, k: torch.tensor([float("nan")]), subsets, seeds=1)
    with pytest.raises(TypeError, match="tensor or array of floats"):
        retrain_measurements(lambda s, k: "oops", subsets, seeds=1)
    sizes = iter([2, 3, 3])
    with pytest.raises(ValueError, match="earlier runs returned 2"):
        retrain_measurements(lambda s, k: torch.zeros(next(sizes)), subsets, seeds=1)
    with pytest.raises(ValueError, match="seeds must be a positive count"):
        retrain_measurements(lambda s, k: torch.zeros(1), subsets, seeds=0)
    with pytest.raises(ValueError, match="seeds is empty"):
        retrain_measurements(lambda s, k: torch.zeros(1), subsets, seeds=[])
    with pytest.raises(ValueError, match=r"\[M, k\] integer tensor"):
        retrain_measurements(lambda s, k: torch.zeros(1), subsets[:2], seeds=1)


def test_lds_checks_shapes_and_marks_constant_queries_undefined():
    subsets = sample_subsets(6, num_subsets=4, alpha=0.5)
    scores = torch.randn(2, 6)
    meas = torch.stack([torch.arange(4.0), torch.ones(4)], dim=1)  # query 1 never changes
    res = lds(scores, subsets, meas)
    assert res.undefined == 1 and math.isnan(res.per_query[1])
    with pytest.raises(ValueError, match="expected"):
        lds(scores, subsets, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="scores must be"):
        lds(torch.zeros(6), subsets, meas)
    with pytest.raises(ValueError, match="cover N=5"):
        lds(torch.zeros(2, 5), subsets.clamp(max=5), meas)


# ---------------------------------------------------------------------------------------
# PBRF
# ---------------------------------------------------------------------------------------


def test_pbrf_response_matches_the_exact_damped_influence_to_first_order():
    model, train, x = _tiny_mlp()
    task, lam, m = hw.ClassificationTask(), 0.05, 5
    space = ParameterSpace(model, select_layers(model, None))
    g = _dense_gn(model, space, x)
    grad_m = space.flatten(layer_gradients(model, task, space.layers, train[m : m + 1], 1))[0]
    first_order = -torch.linalg.solve(g + lam * torch.eye(space.size, dtype=torch.float64), grad_m)

    errors = []
    for eps in (1e-2, 1e-3, 1e-4):
        r = PBRF(model, task, train, damping=lam, epsilon=eps).response(m)
        assert r.converged and r.gradient_norm < 1e-6
        errors.append(float((r.delta / eps - first_order).norm() / first_order.norm()))
    assert errors[-1] < 2e-3
    # first order: the remaining error is O(eps), so it shrinks ~10x per decade of eps
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5


def test_pbrf_scores_agree_with_exact_influence_scores_and_leave_the_model_alone():
    model, train, x = _tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    task, lam = hw.ClassificationTask(), 0.05
    assert PBRF(model, task, train, damping=lam).epsilon == 1 / len(train)  # default: upweight by 1/N
    pb = PBRF(model, task, train, damping=lam, epsilon=-1e-4)  # small, so first order holds tightly
    res = pb.scores(train[:4], indices=[0, 3, 7, 11, 20])
    space = pb.space
    g = _dense_gn(model, space, x)
    gq = space.flatten(layer_gradients(model, task, space.layers, train[:4], 4, measurement=True))
    gt = space.flatten(layer_gradients(model, task, space.layers, [train[i] for i in res.indices], 8))
    exact = gq @ torch.linalg.solve(g + lam * torch.eye(space.size, dtype=torch.float64), gt.T)
    torch.testing.assert_close(res.values, exact, rtol=2e-3, atol=1e-4)
    assert all(res.converged)
    full = torch.zeros(4, len(train), dtype=torch.float64).index_copy(1, torch.tensor(res.indices), exact)
    assert pearson_per_query(full, res).mean > 0.999
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_pbrf_rejects_bad_arguments():
    model, train, _ = _tiny_mlp(n=6)
    task = hw.ClassificationTask()
    with pytest.raises(ValueError, match="damping must be a positive number"):
        PBRF(model, task, train, damping=0.0)
    with pytest.raises(ValueError, match="epsilon must be None"):
        PBRF(model, task, train, damping=0.1, epsilon=0.0)
    with pytest.raises(IndexError, match="out of range"):
        PBRF(model, task, train, damping=0.1).response(6)
    pb = PBRF(model, task, train, damping=0.1)
    res = pb.scores(train[:2], indices=[0, 1])
    with pytest.raises(ValueError, match="score the same queries"):
        pearson_per_query(torch.zeros(3, 6), res)


# ---------------------------------------------------------------------------------------
# LiSSA
# ---------------------------------------------------------------------------------------


def test_lissa_converges_to_the_exact_damped_inverse():
    model, train, x = _tiny_mlp()
    task, lam = hw.ClassificationTask(), 0.2
    ls = LiSSA(model, task, damping=lam, depth=400, batch_size=len(train))  # full batch: deterministic
    space = ls.space
    g = _dense_gn(model, space, x)
    torch.testing.assert_close(dense_gauss_newton(model, task, space, train, 8), g)

    q = layer_gradients(model, task, ls.layers, train[:3], 3, measurement=True)
    sol = space.flatten(ls.solve(q, train))
    exact = torch.linalg.solve(g + lam * torch.eye(space.size, dtype=torch.float64), space.flatten(q).T).T
    assert float((sol - exact).norm() / exact.norm()) < 1e-6
    top = float(torch.linalg.eigvalsh(g)[-1])
    assert ls.scale_used == pytest.approx(2 * (top + lam), rel=1e-3)  # power iteration found the top eigenvalue

    scores = ls.scores(train[:3], train, 8).values
    gt = space.flatten(layer_gradients(model, task, ls.layers, train, 8))
    torch.testing.assert_close(scores, exact @ gt.T, rtol=1e-5, atol=1e-8)

    # minibatches add noise but stay near the answer
    noisy = LiSSA(model, task, damping=lam, depth=400, repeats=2, batch_size=8, seed=1)
    est = space.flatten(noisy.solve(q, train))
    assert float((est - exact).norm() / exact.norm()) < 0.2


def test_lissa_reports_divergence_and_bad_arguments():
    model, train, _ = _tiny_mlp(n=8)
    task = hw.ClassificationTask()
    ls = LiSSA(model, task, damping=0.01, scale=1e-3, depth=200, batch_size=8)
    q = layer_gradients(model, task, ls.layers, train[:1], 1, measurement=True)
    with pytest.raises(ArithmeticError, match="LiSSA diverged"):
        ls.solve(q, train)
    with pytest.raises(ValueError, match="no block for tracked layer"):
        ls.solve({}, train)
    with pytest.raises(ValueError, match="damping must be"):
        LiSSA(model, task, damping=-1.0)
    with pytest.raises(ValueError, match="scale must be None"):
        LiSSA(model, task, scale=0.0)
    with pytest.raises(ValueError, match="depth must be"):
        LiSSA(model, task, depth=0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        LiSSA("model", task)


# ---------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------


def test_recall_and_mrr_match_ranks_worked_out_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7], [0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    relevant = [{2, 3}, {0}, set()]
    # query 0 ranks docs 0,4,2,3,1 -> relevant at ranks 3 and 4; query 1 ranks 4,3,2,1,0 -> rank 5
    res = retrieval(scores, relevant, ks=(1, 3, 4, 5))
    assert res.skipped == 1
    assert res.recall == {1: 0.0, 3: (0.5 + 0.0) / 2, 4: (1.0 + 0.0) / 2, 5: 1.0}
    assert res.mrr == pytest.approx((1 / 3 + 1 / 5) / 2)
    assert res.first_rank.tolist() == [3, 5]


def test_relevant_sets_from_fact_labels_and_retrieval_errors():
    assert relevant_from_labels([0, None, 1, 0], [0, 1, None, 2]) == [{0, 3}, {2}, set(), set()]
    with pytest.raises(ValueError, match="one set per query"):
        retrieval(torch.zeros(2, 3), [{0}])
    with pytest.raises(ValueError, match="outside 0..2"):
        retrieval(torch.zeros(1, 3), [{3}])
    with pytest.raises(ValueError, match="no query has a relevant document"):
        retrieval(torch.zeros(1, 3), [set()])
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval(torch.zeros(1, 3), [{0}], ks=(0,))
    with pytest.raises(ValueError, match=r"scores must be \[Q, N\]"):
        retrieval(torch.zeros(3), [{0}])


# ---------------------------------------------------------------------------------------
# CLI (headwater evaluate ...)
# ---------------------------------------------------------------------------------------


def test_cli_lds_runs_on_a_builtin_task_and_resumes_from_its_cache(tmp_path):
    from typer.testing import CliRunner

    from headwater.cli.evaluate import evaluate_app as app

    args = ["lds", "--task", "regression", "--subsets", "3", "--seeds", "1", "--methods", "identity,ekfac"]
    args += ["--fit-seeds", "1", "--out", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "| ekfac |" in res.output and (tmp_path / "regression" / "lds.json").exists()
    cached = sorted((tmp_path / "regression").glob("retrain-*/subset*.safetensors"))
    assert len(cached) == 3
    first = json.loads((tmp_path / "regression" / "lds.json").read_text())
    mtimes = [p.stat().st_mtime_ns for p in cached]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in cached] == mtimes  # read from the cache, not retrained
    assert json.loads((tmp_path / "regression" / "lds.json").read_text())["metrics"] == first["metrics"]


def test_cli_rejects_unknown_methods_and_tasks_without_facts():
    from typer.testing import CliRunner

    from headwater.cli.evaluate import evaluate_app as app

    res = CliRunner().invoke(app, ["lds", "--methods", "ekfac,magic"])
    assert res.exit_code != 0 and "unknown method" in res.output
    res = CliRunner().invoke(app, ["lds", "--task", "cifar"])
    assert res.exit_code != 0 and "is unknown" in res.output
    res = CliRunner().invoke(app, ["retrieval", "--task", "digits"])
    assert res.exit_code != 0 and "no planted facts" in res.output
    res = CliRunner().invoke(app, ["retrieval", "--k", "a,b"])
    assert res.exit_code != 0 and "comma-separated integers" in res.output
