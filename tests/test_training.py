"""Training-aware attribution against exact references: closed forms, dense matrix exponentials, autograd
through unrolled training, and the optimizer states torch itself holds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import headwater as hw
from _models import MLP, classification_data
from _reference import autograd_grads, blocks, dense_gauss_newton
from headwater.curvature import DenseEigenCurvature, DiagonalCurvature, IdentityCurvature, Inverse
from headwater.data import Subset
from headwater.index import build_index, query_index
from headwater.training import (
    AdamPreconditioner,
    Decay,
    Segment,
    SegmentDynamics,
    Source,
    TrainingRecorder,
    Unrolled,
    calibrate_damping,
    eigen_diagonal,
    read_record,
    read_state_dict,
    source_from_training,
    unrolled_gain,
)

TASK = hw.ClassificationTask()


@pytest.fixture(scope="module")
def mlp_case():
    model = MLP().double()
    train, queries = classification_data(20), classification_data(3, seed=11)
    return model, train, queries


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ the response as a spectral function
def test_unrolled_gain_matches_the_closed_form_in_high_precision_and_its_limits() -> None:
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    t = 3.7
    x = torch.tensor([0.0, 1e-300, 1e-12, 1e-6, 0.3, 2.0, 50.0, 1e4], dtype=torch.float64)
    got = unrolled_gain(x, t)
    for xi, gi in zip(x.tolist(), got.tolist()):
        exact = t if xi == 0 else float(-mpmath.expm1(-t * mpmath.mpf(xi)) / mpmath.mpf(xi))
        assert gi == pytest.approx(exact, rel=1e-14)
    assert torch.isfinite(got).all()
    # Decay is exp(-t x) and together they satisfy x * gain + decay = 1
    d = Decay(t, 1.0).apply(torch.ones_like(x), x, 0.0)
    torch.testing.assert_close(x * got + d, torch.ones_like(x), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_unrolled_tends_to_the_influence_with_the_same_damping_as_lr_times_steps_grows(mlp_case, strategy) -> None:
    model, train, queries = mlp_case
    an = hw.Attributor(model, task=TASK, strategy=strategy, fisher="exact").fit(train, batch_size=5)
    for damping, wd in ((0.05, 0.0), (0.02, 0.03)):
        inverse = an.scores(queries, train, 5, damping=damping + wd).values
        unrolled = an.scores(queries, train, 5, damping=damping, response=Unrolled(2.0, 5e3, weight_decay=wd)).values
        assert _rel(unrolled, inverse) < 1e-6
        short = an.scores(queries, train, 5, damping=damping, response=Unrolled(2.0, 5.0, weight_decay=wd)).values
        assert _rel(short, inverse) > 1e-2  # a finite horizon is a different response


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_unrolled_tends_to_lr_times_steps_times_gradient_dot_products_for_a_short_horizon(mlp_case, strategy) -> None:
    model, train, queries = mlp_case
    an = hw.Attributor(model, task=TASK, strategy=strategy, fisher="exact").fit(train, batch_size=5)
    dots = (
        autograd_grads(model, TASK, queries, an.layers, measurement=True)
        @ autograd_grads(model, TASK, train, an.layers).T
    )
    t = 1e-8
    got = an.scores(queries, train, 5, damping=0.1, response=Unrolled(1e-8, 1.0)).values / t
    assert _rel(got, dots) < 1e-6


def test_unrolled_applies_to_the_index_projected_curvature(tmp_path, mlp_case) -> None:
    model, train, queries = mlp_case
    an = hw.Attributor(model, task=TASK, strategy="identity", fisher="exact")
    kw = {"dim": 8, "batch_size": 5, "projection": "orthogonal", "dtype": "float32"}
    build_index(an, train, path=tmp_path, curvature="dense", **kw)
    inverse = query_index(an, queries, tmp_path, damping=0.05).values.double()
    long = query_index(an, queries, tmp_path, damping=0.05, response=Unrolled(1.0, 1e5)).values.double()
    assert _rel(long, inverse) < 1e-6
    identity = tmp_path / "identity"
    build_index(an, train, path=identity, curvature="identity", **kw)
    dots = query_index(an, queries, identity).values.double()
    short = query_index(an, queries, tmp_path, damping=0.05, response=Unrolled(1e-8, 1.0)).values.double() / 1e-8
    assert _rel(short, dots) < 1e-5


def test_unrolled_without_curvature_is_lr_times_steps_and_its_spec_identifies_it() -> None:
    v = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(Unrolled(0.1, 30).without_curvature(v), 3.0 * v)
    decayed = Unrolled(0.1, 30, weight_decay=0.2).without_curvature(v)
    torch.testing.assert_close(decayed, (1 - math.exp(-0.6)) / 0.2 * v)
    assert Unrolled(0.1, 30).spec() == {"kind": "unrolled", "lr": 0.1, "steps": 30.0, "weight_decay": 0.0}
    assert Unrolled(0.1, 30).spec() != Unrolled(0.1, 31).spec() != Inverse().spec()


def test_identity_strategy_scores_are_lr_times_steps_times_dot_products(mlp_case) -> None:
    op = IdentityCurvature((3, 4))
    v = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(op.solve(v, 0.0, Unrolled(0.1, 30)), 3.0 * v)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0, "steps": 1}, "lr must be a positive number"),
        ({"lr": 1.0, "steps": -2}, "steps must be a positive number"),
        ({"lr": 1.0, "steps": 2, "weight_decay": -1.0}, "weight_decay must be a non-negative number"),
        ({"lr": float("nan"), "steps": 2}, "it must be finite"),
    ],
)
def test_bad_unrolled_arguments_raise_clear_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Unrolled(**kwargs)
    with pytest.raises(ValueError, match=match):
        Decay(**kwargs)


# ------------------------------------------------------------------ one segment against dense matrix exponentials
def _dense_case(mlp_case):
    model, train, _ = mlp_case
    an = hw.Attributor(model, task=TASK, strategy="identity")
    gn = blocks(dense_gauss_newton(model, an.layers, torch.stack([x for x, _ in train]), "ce"), an.layers)
    gen = torch.Generator().manual_seed(5)
    p = {n: torch.rand(an.shapes[n], generator=gen, dtype=torch.float64) * 9 + 1 for n in an.layers}
    return an, gn, p


def _dense_response(g: torch.Tensor, p: torch.Tensor, t: float, wd: float, damping: float, decoupled: bool):
    """R and T of linearised training with rate A (Adam-L2: P (G + wd + damping); AdamW: P (G + damping) + wd)."""
    eye = torch.eye(g.shape[0], dtype=torch.float64)
    pm = torch.diag(p.reshape(-1))
    a = pm @ (g + damping * eye) + wd * eye if decoupled else pm @ (g + (wd + damping) * eye)
    decay = torch.linalg.matrix_exp(-t * a)
    return (eye - decay) @ torch.linalg.inv(a) @ pm, decay


def test_sgd_segment_response_and_carry_equal_dense_matrix_exponentials(mlp_case) -> None:
    an, gn, _ = _dense_case(mlp_case)
    t, wd, damping = 7.0, 0.03, 0.01
    ops = {}
    for n, g in gn.items():
        e, q = torch.linalg.eigh(g + wd * torch.eye(g.shape[0], dtype=torch.float64))
        ops[n] = DenseEigenCurvature(e, q, an.shapes[n])
    dyn = SegmentDynamics(ops, {n: damping for n in ops}, t)
    v = {n: torch.randn(2, *an.shapes[n], dtype=torch.float64) for n in ops}
    respond, carry = dyn.respond(v), dyn.carry(v)
    for n, g in gn.items():
        r, decay = _dense_response(g, torch.ones(an.shapes[n], dtype=torch.float64), t, wd, damping, False)
        flat = v[n].reshape(2, -1)
        torch.testing.assert_close(respond[n].reshape(2, -1), flat @ r.T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(carry[n].reshape(2, -1), flat @ decay, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_segment_is_exact_where_the_preconditioner_commutes_with_the_curvature(mlp_case, decoupled) -> None:
    """The diagonal strategy (both diagonal): the response equals expm of the non-symmetric P (G + wd)."""
    an, gn, p = _dense_case(mlp_case)
    t, wd, damping = 0.7, 0.03, 0.01
    ops, scale, shift = {}, {}, {}
    for n, g in gn.items():
        diag = torch.diagonal(g).reshape(an.shapes[n])
        op = DiagonalCurvature(diag)
        ops[n] = op if decoupled else DiagonalCurvature(diag + wd)
        scale[n] = eigen_diagonal(op, p[n], n)
        shift[n] = eigen_diagonal(op, torch.full(an.shapes[n], wd, dtype=torch.float64), n)
    dyn = SegmentDynamics(ops, {n: damping for n in ops}, t, scale, shift if decoupled else None)
    v = {n: torch.randn(2, *an.shapes[n], dtype=torch.float64) for n in ops}
    respond, carry = dyn.respond(v), dyn.carry(v)
    for n, g in gn.items():
        r, decay = _dense_response(torch.diag(torch.diagonal(g)), p[n], t, wd, damping, decoupled)
        flat = v[n].reshape(2, -1)
        torch.testing.assert_close(respond[n].reshape(2, -1), flat @ r.T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(carry[n].reshape(2, -1), flat @ decay, rtol=1e-9, atol=1e-12)


def test_adam_segment_converges_to_the_influence_and_is_sgd_for_a_uniform_preconditioner(mlp_case) -> None:
    model, train, queries = mlp_case
    an = hw.Attributor(model, task=TASK, fisher="exact").fit(train, batch_size=5)
    wd, damping = 0.02, 0.01
    influence = an.scores(queries, train, 5, damping=wd + damping).values
    gen = torch.Generator().manual_seed(3)
    moments = {k: torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.01 for k, p in model.named_parameters()}
    long = Segment(lr=1.0, steps=1e6, optimizer="adam", second_moments=moments, weight_decay=wd)
    got = Source(model, [model], [long], train, task=TASK, fisher="exact", damping=damping, batch_size=5)
    assert _rel(got.scores(queries).values, influence) < 1e-6
    # v = c^2 everywhere: Adam is SGD at lr / (c + eps)
    uniform = {k: torch.full(p.shape, 4.0, dtype=torch.float64) for k, p in model.named_parameters()}
    adam = Segment(lr=0.3, steps=10, optimizer="adam", second_moments=uniform, eps=0.0, weight_decay=wd)
    sgd = Segment(lr=0.15, steps=10, weight_decay=wd)
    a = Source(model, [model], [adam], train, task=TASK, fisher="exact", batch_size=5).scores(queries).values
    b = Source(model, [model], [sgd], train, task=TASK, fisher="exact", batch_size=5).scores(queries).values
    assert _rel(a, b) < 1e-10


# ------------------------------------------------------------------ SOURCE on linear regression: closed forms
def _orthogonal_design(n: int, scales: list[float], seed: int) -> torch.Tensor:
    """Centered inputs with orthogonal columns: E[a a^T] of a = [x, 1] is diagonal, so EK-FAC's basis is exact."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(scales), generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    return q * torch.tensor(scales, dtype=torch.float64) * math.sqrt(n)


def _linreg():
    d = 3
    x = torch.cat([_orthogonal_design(10, [2.0, 1.3, 0.5], 0), _orthogonal_design(12, [1.5, 0.7, 0.3], 1)])
    w = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    y = x @ w.T + 0.3 * torch.randn(len(x), 1, generator=gen, dtype=torch.float64)
    train = [(x[i], y[i]) for i in range(len(x))]
    xq = torch.randn(3, d, generator=gen, dtype=torch.float64)
    queries = [(xq[i], xq[i] @ w.T) for i in range(3)]
    ckpts = []
    for k in range(2):
        lin = nn.Sequential(nn.Linear(d, 1)).double()
        with torch.no_grad():
            lin[0].weight.copy_(torch.randn(1, d, generator=gen, dtype=torch.float64))
            lin[0].bias.fill_(0.1 * k)
        ckpts.append(lin.state_dict())
    return nn.Sequential(nn.Linear(d, 1)).double(), train, queries, ckpts, [list(range(10)), list(range(10, 22))]


def _grads(theta: dict, data: list) -> torch.Tensor:
    """Per-example gradients of 0.5 (w.x + b - y)^2 in canonical layout [w, b]: [N, d + 1]."""
    w, b = theta["0.weight"], theta["0.bias"]
    a = torch.stack([torch.cat([x, torch.ones(1, dtype=torch.float64)]) for x, _ in data])
    r = a @ torch.cat([w[0], b]) - torch.stack([y.reshape(-1)[0] for _, y in data])
    return a * r[:, None]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_two_segment_source_equals_the_closed_form_of_linearised_training(optimizer) -> None:
    """Linear regression, one output: G = E[a a^T] exactly, its eigenbasis is the coordinates (orthogonal design),
    so SOURCE must equal  sum_l v_l^T R_l g_l  with R_l, T_l from dense matrix exponentials, per segment data."""
    model, train, queries, ckpts, parts = _linreg()
    hps = [(0.2, 30.0, 0.05, 0.5), (0.05, 40.0, 0.01, 1.0)]  # lr, steps, weight decay, loss scale
    gen = torch.Generator().manual_seed(9)
    moments = [{k: torch.rand(v.shape, generator=gen, dtype=torch.float64) + 0.1 for k, v in c.items()} for c in ckpts]
    segments = [
        Segment(
            lr=lr,
            steps=k,
            data=parts[i],
            weight_decay=wd,
            loss_scale=c,
            optimizer=optimizer,
            second_moments=None if optimizer == "sgd" else moments[i],
            eps=0.0,
        )
        for i, (lr, k, wd, c) in enumerate(hps)
    ]
    task = hw.RegressionTask()
    src = Source(model, ckpts, segments, train, task=task, fisher="exact", batch_size=4)
    got = src.scores(queries).values

    v = _grads(ckpts[1], queries)  # [Q, d + 1] at the final weights
    expected = torch.zeros(len(queries), len(train), dtype=torch.float64)
    for i in (1, 0):
        lr, k, wd, c = hps[i]
        data = [train[j] for j in parts[i]]
        a = torch.stack([torch.cat([x, torch.ones(1, dtype=torch.float64)]) for x, _ in data])
        g = a.T @ a / len(a)
        if optimizer == "sgd":
            p = torch.ones(4, dtype=torch.float64)
        else:
            p = 1 / torch.cat([moments[i]["0.weight"][0], moments[i]["0.bias"]]).sqrt()
        r, decay = _dense_response(g, p, c * lr * k, wd / c, 0.0, optimizer == "adamw")
        expected[:, parts[i]] = v @ r @ _grads(ckpts[i], data).T
        v = v @ decay
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    assert src.cost == {**src.cost, "fit_passes": 4, "scoring_passes": 2, "query_passes": 1}


def test_source_converges_to_autograd_through_unrolled_gradient_descent_as_segments_refine() -> None:
    """The truth: d f_q(theta_T) / d eps_m by autograd through 120 real full-batch GD steps in two phases on
    different data; SOURCE's error shrinks as the segments refine (the gradient is held at each segment's end),
    while the influence function's stays above 100%."""
    torch.manual_seed(0)
    d, n = 3, 16
    x = torch.randn(n, d, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.4], dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-1.0], [2.0]], dtype=torch.float64) + 0.3 * torch.randn(n, 1, dtype=torch.float64)
    xq = torch.randn(2, d, dtype=torch.float64)
    train, queries = [(x[i], y[i]) for i in range(n)], [(xq[i], torch.zeros(1, dtype=torch.float64)) for i in range(2)]
    phases = [(0.02, 60, list(range(0, 10)), 0.01), (0.015, 60, list(range(6, 16)), 0.0)]

    def run(eps: torch.Tensor, per_phase: int) -> tuple[torch.Tensor, list[dict]]:
        w = torch.zeros(1, d, dtype=torch.float64, requires_grad=True) + 0 * eps.sum()
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True) + 0 * eps.sum()
        ckpts = []
        for lr, steps, data, wd in phases:
            idx = torch.tensor(data)
            for k in range(steps):
                per = 0.5 * ((x[idx] @ w.T + b - y[idx]) ** 2).sum(1)
                j = per.mean() + (eps[idx] * per).sum() + 0.5 * wd * ((w**2).sum() + (b**2).sum())
                gw, gb = torch.autograd.grad(j, (w, b), create_graph=True)
                w, b = w - lr * gw, b - lr * gb
                if (k + 1) % (steps // per_phase) == 0:
                    ckpts.append({"0.weight": w.detach().clone(), "0.bias": b.detach().clone()})
        return 0.5 * ((xq @ w.T + b) ** 2).sum(1), ckpts

    eps = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    f, _ = run(eps, 1)
    truth = -torch.stack([torch.autograd.grad(f[q], eps, retain_graph=True)[0] for q in range(2)])
    model, task, errors = nn.Sequential(nn.Linear(d, 1)).double(), hw.RegressionTask(), []
    for per_phase in (1, 5, 20):
        _, ckpts = run(torch.zeros(n, dtype=torch.float64), per_phase)
        segments = [
            Segment(lr=lr, steps=steps // per_phase, data=data, weight_decay=wd)
            for lr, steps, data, wd in phases
            for _ in range(per_phase)
        ]
        got = Source(model, ckpts, segments, train, task=task, fisher="exact", batch_size=8).scores(queries).values
        errors.append(float((got - truth).norm() / truth.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.08  # measured: 0.36, 0.19, 0.07
    model.load_state_dict(ckpts[-1])
    an = hw.Attributor(model, task=task, fisher="exact").fit(train, 8)
    influence = an.scores(queries, train, 8, damping=1e-8).values
    assert float((influence - truth).norm() / truth.norm()) > 1.0


def test_a_sequence_scores_only_in_the_segments_whose_data_held_it(mlp_case) -> None:
    model, train, queries = mlp_case
    segs = [Segment(lr=0.5, steps=3, data=list(range(8))), Segment(lr=0.5, steps=3, data=list(range(12, 20)))]
    res = Source(model, [model, model], segs, train, task=TASK, fisher="exact", batch_size=5).scores(queries)
    assert bool((res.values[:, 8:12] == 0).all()) and bool((res.values[:, :8] != 0).all())


# ------------------------------------------------------------------ checkpoints, TracIn
def test_checkpoints_are_modules_state_dicts_or_directories(tmp_path, mlp_case) -> None:
    from safetensors.torch import save_file

    model, train, queries = mlp_case
    other = MLP(seed=4).double()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "a" / "model.safetensors"))
    torch.save(model.state_dict(), tmp_path / "b" / "pytorch_model.bin")
    for k, v in read_state_dict(tmp_path / "a").items():
        torch.testing.assert_close(v, other.state_dict()[k])
    segs = [Segment(lr=0.2, steps=4), Segment(lr=0.1, steps=6, weight_decay=0.01)]
    kw = {"task": TASK, "fisher": "exact", "batch_size": 5}
    reference = Source(model, [other, model], segs, train, **kw).scores(queries).values
    for ckpts in ([tmp_path / "a", tmp_path / "b"], [str(tmp_path / "a"), model.state_dict()]):
        torch.testing.assert_close(
            Source(MLP(seed=9).double(), ckpts, segs, train, **kw).scores(queries).values, reference
        )
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        read_state_dict(tmp_path)
    with pytest.raises(ValueError, match="does not fit the model"):
        Source(nn.Sequential(nn.Linear(5, 3)).double(), [tmp_path / "a"], segs[:1], train, **kw).scores(queries)


def test_tracin_is_the_learning_rate_weighted_sum_of_checkpoint_gradient_dot_products(mlp_case) -> None:
    model, train, queries = mlp_case
    other = MLP(seed=4).double()
    segs = [Segment(lr=0.2, steps=4, data=list(range(10))), Segment(lr=0.1, steps=6, loss_scale=0.5)]
    src = Source(model, [other, model], segs, train, task=TASK, fisher="exact", batch_size=5)
    expected = torch.zeros(len(queries), len(train), dtype=torch.float64)
    for m, t, cols in ((other, 0.8, list(range(10))), (model, 0.3, list(range(20)))):
        an = hw.Attributor(m, task=TASK, strategy="identity")
        gq = autograd_grads(m, TASK, queries, an.layers, measurement=True)
        expected[:, cols] += t * gq @ autograd_grads(m, TASK, [train[i] for i in cols], an.layers).T
    torch.testing.assert_close(src.tracin(queries).values, expected)
    ensemble = torch.zeros_like(expected)
    for m, cols in ((other, list(range(10))), (model, list(range(20)))):
        an = hw.Attributor(m, task=TASK, fisher="exact").fit(Subset(train, cols), 5)
        ensemble[:, cols] += an.scores(queries, Subset(train, cols), 5).values
    torch.testing.assert_close(src.tracin(queries, curvature="ekfac").values, ensemble)


# ------------------------------------------------------------------ Adam's state
def test_adam_second_moments_come_bias_corrected_from_the_optimizer_and_its_state_dict(mlp_case) -> None:
    model, train, _ = mlp_case
    m = MLP(seed=2).double()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.9, 0.99))
    x, y = torch.stack([a for a, _ in train]), torch.stack([b for _, b in train])
    for _ in range(3):
        opt.zero_grad()
        TASK.loss(m, (x, y)).backward()
        opt.step()
    layers = hw.Attributor(m, task=TASK, strategy="identity").layers
    expected = {}
    for name, p in m.named_parameters():
        expected[name] = opt.state[p]["exp_avg_sq"] / (1 - 0.99**3)
    live = AdamPreconditioner.from_optimizer(opt, m, layers)
    saved = AdamPreconditioner.from_state_dict(opt.state_dict(), m, layers)
    torch.testing.assert_close(live.second_moments["fc1"][:, :-1], expected["fc1.weight"])
    torch.testing.assert_close(live.second_moments["fc1"][:, -1], expected["fc1.bias"])
    for n in layers:
        torch.testing.assert_close(saved.second_moments[n], live.second_moments[n])
    torch.testing.assert_close(live.scale("fc2"), 1 / (live.second_moments["fc2"].sqrt() + 1e-8))
    with pytest.raises(ValueError, match="holds no Adam second moments yet"):
        AdamPreconditioner.from_optimizer(torch.optim.Adam(MLP().parameters()), MLP(), layers)
    with pytest.raises(TypeError, match="is not Adam-like"):
        AdamPreconditioner.from_optimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, layers)
    with pytest.raises(ValueError, match=r"has no entry for \['fc1.bias', 'fc2.weight'"):
        AdamPreconditioner.from_parameters(m, layers, {"fc1.weight": expected["fc1.weight"]})


def test_estimated_second_moments_are_the_mean_squared_minibatch_gradient(mlp_case) -> None:
    model, train, _ = mlp_case
    an = hw.Attributor(model, task=TASK, strategy="identity")
    est = AdamPreconditioner.estimate(an, train, batch_size=5, loss_scale=2.0)
    g = autograd_grads(model, TASK, train, an.layers)  # [N, P]
    batch_means = g.reshape(4, 5, -1).mean(1)
    expected = 4.0 * (batch_means**2).mean(0)
    got = torch.cat([est.second_moments[n].reshape(-1) for n in an.layers])
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lr": 0.1, "steps": 2, "optimizer": "lion"}, ValueError, "Segment.optimizer='lion' is unknown"),
        ({"lr": 0.1, "steps": 2, "optimizer": "adam"}, ValueError, "needs second_moments"),
        ({"lr": 0.1, "steps": 2, "second_moments": {}}, ValueError, "needs optimizer='adam' or 'adamw'"),
        (
            {"lr": 0.1, "steps": 2, "optimizer": "adam", "momentum": 0.9, "second_moments": "estimate"},
            ValueError,
            "leave momentum=0",
        ),
        ({"lr": 0.1, "steps": 2, "data": []}, ValueError, "Segment.data is empty"),
        ({"lr": 0.1, "steps": 2, "loss_scale": "tokens"}, ValueError, "Segment.loss_scale='tokens' is unknown"),
        ({"lr": 0.1, "steps": 2, "optimizer": "adam", "second_moments": "guess"}, ValueError, "only string"),
        ({"lr": -0.1, "steps": 2}, ValueError, "Segment.lr must be a positive number"),
    ],
)
def test_bad_segments_raise_clear_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        Segment(**kwargs)


def test_bad_source_arguments_raise_clear_errors(mlp_case) -> None:
    model, train, _ = mlp_case
    seg = Segment(lr=0.1, steps=2)
    with pytest.raises(ValueError, match="got 2 checkpoints for 1 segments"):
        Source(model, [model, model], [seg], train, task=TASK)
    with pytest.raises(ValueError, match="segments is empty"):
        Source(model, [], [], train, task=TASK)
    with pytest.raises(TypeError, match=r"segments\[0\] must be a headwater.training.Segment"):
        Source(model, [model], [{"lr": 0.1}], train, task=TASK)
    with pytest.raises(TypeError, match=r"checkpoints\[0\] must be an nn.Module"):
        Source(model, [3], [seg], train, task=TASK)
    with pytest.raises(ValueError, match="indexes example 99, but train has 20 examples"):
        Source(model, [model], [Segment(lr=0.1, steps=2, data=[99])], train, task=TASK)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Source("gpt2", [model], [seg], train, task=TASK)
    with pytest.raises(ValueError, match="curvature='lissa' is unknown"):
        Source(model, [model], [seg], train, task=TASK).tracin(train[:1], curvature="lissa")


# ------------------------------------------------------------------ recording a plain PyTorch run
def _train_recorded(directory, model, data, steps, stage, segments, lr=0.05, wd=0.01):
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    x, y = torch.stack([a for a, _ in data]), torch.stack([b for _, b in data])
    moments = []
    with TrainingRecorder(directory, model, opt, segments=segments, total_steps=steps, data=data, stage=stage) as rec:
        for k in range(steps):
            opt.zero_grad()
            (TASK.loss(model, (x, y)) / len(data)).backward()
            opt.step()
            sched.step()
            if (k + 1) in rec.boundaries or k + 1 == steps:
                moments.append(
                    {n: opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** (k + 1)) for n, p in model.named_parameters()}
                )
    return moments


def test_a_recorded_run_rebuilds_source_with_nothing_typed_by_hand(tmp_path, mlp_case) -> None:
    _, train, queries = mlp_case
    model = MLP(seed=1).double()
    part_a, part_b = Subset(train, list(range(12))), Subset(train, list(range(12, 20)))
    m1 = _train_recorded(tmp_path, model, part_a, 6, "pretrain", 3)
    m2 = _train_recorded(tmp_path, model, part_b, 4, "finetune", 2, lr=0.01, wd=0.0)
    record = read_record(tmp_path)
    assert [s["name"] for s in record["stages"]] == ["pretrain", "finetune"]
    assert [(s["stage"], s["steps"]) for s in record["segments"]] == [("pretrain", 2)] * 3 + [("finetune", 2)] * 2
    # the schedule lr_k = lr / (1 + k), summed per segment, as each step actually used it
    sums = [s["groups"][0]["lr_sum"] for s in record["segments"]]
    assert sums == pytest.approx(
        [0.05 * (1 + 1 / 2), 0.05 * (1 / 3 + 1 / 4), 0.05 * (1 / 5 + 1 / 6), 0.01 * 1.5, 0.01 * (1 / 3 + 1 / 4)]
    )
    src = source_from_training(
        tmp_path,
        {"pretrain": part_a, "finetune": part_b},
        model=MLP(seed=7).double(),
        task=TASK,
        fisher="exact",
        batch_size=5,
    )
    assert [s.data for s in src.segments] == [list(range(12))] * 3 + [list(range(12, 20))] * 2
    for seg, moments in zip(src.segments, m1 + m2):
        for name, v in moments.items():
            torch.testing.assert_close(seg.second_moments[name], v)
    assert src.segments[0].optimizer == "adam" and src.segments[0].lr * 2 == pytest.approx(sums[0])
    # the same Source by hand, from the weights the recorder saved
    ckpts = [read_state_dict(tmp_path / s["checkpoint"]) for s in record["segments"]]
    torch.testing.assert_close(ckpts[-1]["fc1.weight"], model.fc1.weight)
    hand = [
        Segment(
            lr=sums[i] / 2,
            steps=2,
            data=src.segments[i].data,
            optimizer="adam",
            second_moments=mom,
            weight_decay=0.01 if i < 3 else 0.0,
        )
        for i, mom in enumerate(m1 + m2)
    ]
    by_hand = Source(MLP(seed=7).double(), ckpts, hand, train, task=TASK, fisher="exact", batch_size=5)
    torch.testing.assert_close(src.scores(queries).values, by_hand.scores(queries).values)
    only = source_from_training(tmp_path, part_b, model=MLP().double(), stages=["finetune"], task=TASK)
    assert len(only.segments) == 2 and only.segments[0].data is None


def test_recording_errors_name_the_problem(tmp_path, mlp_case) -> None:
    _, train, _ = mlp_case
    model = MLP().double()
    part = Subset(train, list(range(10)))
    _train_recorded(tmp_path, model, part, 2, "a", 1)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="stage 'a' is already recorded"):
        TrainingRecorder(tmp_path, model, opt, stage="a")
    with pytest.raises(ValueError, match="needs total_steps="):
        TrainingRecorder(tmp_path / "x", model, opt, segments=3)
    with pytest.raises(ValueError, match="not several"):
        TrainingRecorder(tmp_path / "y", model, opt, every=2, segments=3, total_steps=6)
    with pytest.raises(TypeError, match="is not modelled"):
        TrainingRecorder(tmp_path / "z", model, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="is not what it trained on"):
        source_from_training(tmp_path, Subset(train, list(range(1, 11))), model=MLP().double(), task=TASK)
    with pytest.raises(FileNotFoundError, match="holds no training record"):
        source_from_training(tmp_path / "nothing", part, model=model)
    with pytest.raises(ValueError, match="not in the record"):
        source_from_training(tmp_path, part, model=model, stages=["b"])
    (tmp_path / "run.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(hw.CorruptArtifactError, match="has no checksum"):
        read_record(tmp_path)


# ------------------------------------------------------------------ calibration
def test_implied_weight_decay_is_exact_at_the_ridge_optimum_and_the_calibration_is_json_and_cached(tmp_path) -> None:
    """Ridge regression at its closed-form optimum: mean gradient + wd theta = 0, so the implied decay is wd."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-1.0], [0.5]], dtype=torch.float64) + 0.5 * torch.randn(
        24, 1, generator=gen, dtype=torch.float64
    )
    wd = 0.3
    a = torch.cat([x, torch.ones(24, 1, dtype=torch.float64)], 1)
    theta = torch.linalg.solve(a.T @ a / 24 + wd * torch.eye(4, dtype=torch.float64), a.T @ y / 24)
    model = nn.Sequential(nn.Linear(3, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(theta[:3].T)
        model[0].bias.copy_(theta[3])
    train = [(x[i], y[i]) for i in range(24)]
    an = hw.Attributor(model, task=hw.RegressionTask(), fisher="exact", workdir=tmp_path).fit(train, 8)
    cal = calibrate_damping(an, train, subsets=4, steps=5, probes=4, scales=(0.01, 0.1, 1.0), batch_size=8)
    assert cal.implied_weight_decay == pytest.approx(wd, rel=1e-8)
    assert cal.scale in (0.01, 0.1, 1.0)
    assert cal.damping == pytest.approx({"0": cal.scale * float(an.curvature["0"].lam.mean())})
    assert cal.cost_fits == pytest.approx((4 * 5 * 10 + 24 + 4) / 48)
    assert [c["scale"] for c in cal.curve] == [0.01, 0.1, 1.0]
    json.dumps(cal.to_json(), allow_nan=False)
    again = calibrate_damping(an, train, subsets=4, steps=5, probes=4, scales=(0.01, 0.1, 1.0), batch_size=8)
    assert again.seconds == cal.seconds  # read back from the workdir, not recomputed
    assert an.damping("calibrate") == cal.damping  # damping="calibrate" reads it back
    torch.testing.assert_close(
        an.scores(train[:2], train, damping="calibrate").values,
        an.scores(train[:2], train, damping=cal.damping["0"]).values,
    )
    fresh = hw.Attributor(model, task=hw.RegressionTask(), fisher="exact", workdir=tmp_path / "other").fit(train, 8)
    with pytest.raises(ValueError, match='damping="calibrate" needs a calibration in the workdir'):
        fresh.damping("calibrate")
    with pytest.raises(ValueError, match="at least 2 damping scales"):
        calibrate_damping(an, train, scales=(0.1,))
    with pytest.raises(ValueError, match="nothing to calibrate"):
        calibrate_damping(hw.Attributor(model, task=hw.RegressionTask(), strategy="identity"), train)


def test_more_refusals_name_the_argument_and_what_to_do(tmp_path, mlp_case) -> None:
    from headwater.integrations import HeadwaterCallback

    _, train, _ = mlp_case
    model = MLP().double()
    with pytest.raises(ValueError, match="AMSGrad keeps a running max"):
        TrainingRecorder(tmp_path / "a", model, torch.optim.Adam(model.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="give segments= or every=, not both"):
        HeadwaterCallback(tmp_path / "b", segments=3, every=2)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown weights format '.npz'"):
        read_state_dict(tmp_path / "w.npz")
    layers = hw.Attributor(model, task=TASK, strategy="identity").layers
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="has 4 parameters but 1 names"):
        AdamPreconditioner.from_state_dict(opt.state_dict(), model, layers, param_names=["fc1.weight"])
    with pytest.raises(TypeError, match="must be an optimizer's state_dict"):
        AdamPreconditioner.from_state_dict({"state": {}}, model, layers)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        AdamPreconditioner({"fc1": -torch.ones(6, 6, dtype=torch.float64)})
    _train_recorded(tmp_path / "r", model, Subset(train, list(range(8))), 2, "a", 1)
    _train_recorded(tmp_path / "r", model, Subset(train, list(range(8, 16))), 2, "b", 1)
    with pytest.raises(ValueError, match=r"data has no dataset for stages \['b'\]"):
        source_from_training(tmp_path / "r", {"a": Subset(train, list(range(8)))}, model=model, task=TASK)
    with pytest.raises(ValueError, match="give data as a mapping stage -> dataset"):
        source_from_training(tmp_path / "r", train, model=model, task=TASK)
    with pytest.raises(ValueError, match=r"indices\['b'\] must be non-empty positions in data"):
        source_from_training(tmp_path / "r", train, model=model, task=TASK, indices={"a": range(8), "b": [99]})
    with pytest.raises(ValueError, match=r"indices has no entry for stages \['b'\]"):
        source_from_training(tmp_path / "r", train, model=model, task=TASK, indices={"a": range(8)})
    both = source_from_training(
        tmp_path / "r", train, model=model, task=TASK, indices={"a": range(8), "b": range(8, 16)}
    )
    assert [s.data for s in both.segments] == [list(range(8)), list(range(8, 16))]
