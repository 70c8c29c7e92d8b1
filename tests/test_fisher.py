"""Fisher estimators: several draws per forward, the signed top-m-plus-tail estimator, "auto".

References are exact and independent of the estimators: ``fisher="exact"`` (itself checked
against dense Gauss-Newton in test_curvature), and for a language model the dense per-sequence
Gauss-Newton from ``headwater.gauss_newton`` (jvp/vjp, no capture), read off in a
fixed Kronecker eigenbasis.
"""

from __future__ import annotations

import pytest
import torch

import headwater as hw
from _models import MLP, classification_data, lm_data, regression_data, tiny_gpt2
from headwater.curvature import LambdaAccumulator
from headwater.gauss_newton import ParameterSpace, dense_gauss_newton
from headwater.storage import save_json
from headwater.task import Task


def _rel_error(an: hw.Attributor, ref: hw.Attributor) -> float:
    """Worst relative Frobenius error over layers of the dense curvature blocks."""
    errs = []
    for n in ref.layers:
        exact = ref.curvature[n].to_dense()
        errs.append(((an.curvature[n].to_dense() - exact).norm() / exact.norm()).item())
    return max(errs)


def _own_loss(cls: type) -> type:
    """``cls`` with ``loss`` overridden (same body), so fitting goes through ``loss(sample=True)``
    exactly as before ``samples`` existed: one draw per batch, one cross-entropy."""
    return type(f"Old{cls.__name__}", (cls,), {"loss": lambda self, m, b, sample=False: cls.loss(self, m, b, sample)})


CASES = {
    "classification": (MLP().double(), classification_data(32), hw.ClassificationTask, {}),
    "regression": (MLP().double(), regression_data(32), hw.RegressionTask, {}),
    "lm": (tiny_gpt2(), lm_data(8), hw.LanguageModelingTask, {"modules": "mlp"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_sample_reproduces_the_single_draw_fit_exactly(case):
    model, data, cls, kw = CASES[case]
    task, ref_task = cls(), _own_loss(cls)()
    new = hw.Attributor(model, task=task, fisher="sampled", samples=1, seed=3, **kw).fit(data, batch_size=4)
    old = hw.Attributor(model, task=ref_task, seed=3, **kw).fit(data, batch_size=4)
    for n in new.layers:
        for key, value in new.curvature[n].tensors().items():
            assert torch.equal(value, old.curvature[n].tensors()[key]), (n, key)


class _DefaultRegression(hw.RegressionTask):
    """Draws through ``Task.sampled_losses``' default: one forward pass per draw."""

    sampled_losses = Task.sampled_losses


@pytest.mark.parametrize(
    "task, data, samples",
    [
        (hw.ClassificationTask(), classification_data(64), 400),
        (hw.RegressionTask(), regression_data(64), 400),
        (_DefaultRegression(), regression_data(64), 25),
    ],
)
def test_many_samples_converge_to_the_exact_fisher(task, data, samples):
    model = MLP().double()
    exact = hw.Attributor(model, task=task, fisher="exact").fit(data, batch_size=64)
    one = _rel_error(hw.Attributor(model, task=task, fisher="sampled").fit(data, batch_size=64), exact)
    many = _rel_error(hw.Attributor(model, task=task, fisher="sampled", samples=samples).fit(data, 64), exact)
    assert many < one * 2.5 / samples**0.5  # error ~ 1/sqrt(samples)


def test_topk_is_the_exact_fisher_for_one_regression_output():
    """Squared error with one output: the random sign squares away, so one pass is exact."""
    model, data, task = MLP(d_out=1).double(), regression_data(40, d_out=1), hw.RegressionTask()
    exact = hw.Attributor(model, task=task, fisher="exact").fit(data, batch_size=8)
    for seed in (0, 1):
        topk = hw.Attributor(model, task=task, fisher="topk", seed=seed).fit(data, batch_size=8)
        assert _rel_error(topk, exact) < 1e-10


def _peaked_classifier() -> tuple[MLP, list[tuple]]:
    """A confident 10-class model: scaled-up output weights put ~all softmax mass on one class."""
    model = MLP(d_out=10).double()
    with torch.no_grad():
        model.fc2.weight.mul_(60.0)
    return model, classification_data(64, classes=10)


def test_peaked_classifier_is_confident():
    model, data = _peaked_classifier()
    p = torch.softmax(model(torch.stack([x for x, _ in data])), dim=-1).max(-1).values
    assert p.median() > 0.95 and p.min() < 0.9  # confident, with some tail mass left to draw


def test_importance_one_pass_spreads_far_less_than_one_draw_over_seeds():
    """The issue's failure mode: Lambda's mean (and with it the damping) hinges on rare draws.

    At equal cost (one backward pass each), importance-weighted labels give every draw the
    same logit-gradient norm, so the output layer's mean(Lambda) is exact for every seed and
    the hidden layer's spreads a small fraction of plain sampling's; both average to the
    exact Fisher's.
    """
    model, data = _peaked_classifier()
    task = hw.ClassificationTask()
    exact = hw.Attributor(model, task=task, fisher="exact").fit(data, batch_size=16)

    def mean_lambdas(fisher: str) -> torch.Tensor:
        out = []
        for seed in range(12):
            an = hw.Attributor(model, task=task, fisher=fisher, seed=seed).fit(data, batch_size=16)
            out.append(torch.stack([op.lam.mean() for op in an.curvature.values()]))
        return torch.stack(out)  # [seeds, layers] in order fc1, fc2

    reference = torch.stack([op.lam.mean() for op in exact.curvature.values()])
    sampled, importance = mean_lambdas("sampled"), mean_lambdas("importance")
    rel_sd = lambda x: x.std(0) / reference  # noqa: E731
    assert (rel_sd(sampled) > 0.1).all()  # the problem is there to solve
    assert rel_sd(importance)[1] < 1e-10
    assert rel_sd(importance)[0] < rel_sd(sampled)[0] / 4, (rel_sd(importance), rel_sd(sampled))
    assert ((importance.mean(0) - reference).abs() / reference).max() < 3 * rel_sd(importance).max() + 1e-10


def _bias_and_noise(exact: torch.Tensor, runs: torch.Tensor) -> tuple[float, float]:
    """||mean of runs - exact|| and 2 x the standard error that mean would have if unbiased."""
    rms = (runs - exact).pow(2).flatten(1).sum(1).mean().sqrt()
    return (runs.mean(0) - exact).norm().item(), 2 * rms.item() / len(runs) ** 0.5


def test_topk_below_every_class_is_unbiased_on_a_classifier():
    """Top-1 plus one tail draw over 5 classes: the diagonal of G (linear in the estimate) averages to exact."""
    model, data, task = MLP(d_out=5).double(), classification_data(64, classes=5), hw.ClassificationTask()
    exact = hw.Attributor(model, task=task, strategy="diagonal", fisher="exact").fit(data, batch_size=64)
    runs = []
    for seed in range(40):
        an = hw.Attributor(model, task=task, strategy="diagonal", fisher="topk", top=1, seed=seed)
        runs.append(torch.cat([op.diag.flatten() for op in an.fit(data, batch_size=64).curvature.values()]))
    bias, noise = _bias_and_noise(torch.cat([op.diag.flatten() for op in exact.curvature.values()]), torch.stack(runs))
    assert bias < noise


@pytest.fixture(scope="module")
def lm_lambda():
    """Tiny GPT-2, one tracked layer: a fixed eigenbasis, the exact Lambda in it, and an estimator."""
    model, data, modules = tiny_gpt2(), lm_data(8), ["transformer.h.1.mlp.c_proj"]
    base = hw.Attributor(model, modules=modules, strategy="kfac").fit(data, batch_size=8)
    name, op = modules[0], base.curvature[modules[0]]
    g = dense_gauss_newton(model, base.task, ParameterSpace(model, base.layers), data, batch_size=8)
    q = torch.kron(op.q_s, op.q_a)  # any fixed orthonormal basis: E[(Q^T dW)^2] = diag(Q^T G Q)
    exact = torch.diagonal(q.T @ g @ q).reshape(op.shape)

    def estimate(fisher: str, top: int, seed: int, samples: int = 1) -> torch.Tensor:
        an = hw.Attributor(model, modules=modules, fisher=fisher, top=top, samples=samples, seed=seed)
        acc = LambdaAccumulator({name: op})
        an.run(data, acc, an.fit_losses, "eigenvalue correction", 8)
        return acc.ekfac()[name].lam

    return exact, estimate


@pytest.mark.parametrize("top, samples, seeds", [(3, 1, 80), (40, 1, 40), (40, 3, 30)])
def test_topk_lambda_is_unbiased_on_a_multi_token_lm(lm_lambda, top, samples, seeds):
    """The random signs cancel cross-slot and cross-token terms: the seed average approaches
    the dense GN's Lambda. top=40 = the vocabulary: every token enters exactly, only signs are random.
    """
    exact, estimate = lm_lambda
    bias, noise = _bias_and_noise(exact, torch.stack([estimate("topk", top, s, samples) for s in range(seeds)]))
    assert bias < noise


def test_importance_lambda_is_unbiased_on_a_multi_token_lm(lm_lambda):
    exact, estimate = lm_lambda
    bias, noise = _bias_and_noise(exact, torch.stack([estimate("importance", 8, s) for s in range(60)]))
    assert bias < noise


def test_bad_samples_raise_clear_errors():
    model = MLP().double()
    with pytest.raises(ValueError, match="samples must be a positive integer, got 0"):
        hw.Attributor(model, task=hw.ClassificationTask(), samples=0)
    with pytest.raises(ValueError, match="samples=4 draws pseudo-labels, but fisher='exact' draws none"):
        hw.Attributor(model, task=hw.ClassificationTask(), fisher="exact", samples=4)
    with pytest.raises(ValueError, match="top must be a positive integer, got 0"):
        hw.Attributor(model, task=hw.ClassificationTask(), top=0)
    with pytest.raises(NotImplementedError, match="fisher='topk' needs _Custom.topk_losses"):
        hw.Attributor(model, task=_Custom(), fisher="topk").fit(regression_data(4))
    with pytest.raises(NotImplementedError, match="fisher='importance' needs _Custom.importance_losses"):
        hw.Attributor(model, task=_Custom(), fisher="importance").fit(regression_data(4))


@pytest.mark.parametrize("fisher", ["topk", "importance"])
def test_non_finite_outputs_stop_the_label_draw_with_a_clear_error(fisher):
    model = MLP().double()
    with torch.no_grad():
        model.fc2.bias[0] = float("nan")
    with pytest.raises(hw.NonFiniteError, match="outputs contain NaN or inf, so no Fisher can be estimated"):
        hw.Attributor(model, task=hw.ClassificationTask(), fisher=fisher).fit(classification_data(4))


class _Custom(Task):
    """A user's task with only the required methods."""

    def loss(self, model, batch, sample=False):
        return hw.RegressionTask().loss(model, batch, sample)

    def measurement(self, model, batch):
        return self.loss(model, batch)


@pytest.mark.parametrize(
    "task, expected",
    [
        (hw.ClassificationTask(), "topk"),
        (hw.RegressionTask(), "topk"),
        (hw.LanguageModelingTask(), "topk"),
        (_Custom(), "sampled"),
        (_own_loss(hw.ClassificationTask)(), "sampled"),
    ],
)
def test_auto_picks_topk_where_the_task_implements_it_on_its_own_loss(task, expected, tmp_path):
    an = hw.Attributor(MLP().double(), task=task, workdir=tmp_path)
    assert an.fisher == expected
    import json

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["fisher"] == expected and saved["top"] == (8 if expected == "topk" else None)


def test_workdir_records_top(tmp_path):
    model = MLP().double()
    hw.Attributor(model, task=hw.ClassificationTask(), top=2, workdir=tmp_path)
    with pytest.raises(ValueError, match="top=2 \\(this Attributor has top=3\\)"):
        hw.Attributor(model, task=hw.ClassificationTask(), top=3, workdir=tmp_path)


def test_workdir_records_samples_and_old_workdirs_mean_one(tmp_path):
    model, data = MLP().double(), classification_data(8)
    hw.Attributor(model, task=hw.ClassificationTask(), samples=2, workdir=tmp_path / "a").fit(data)
    with pytest.raises(ValueError, match="samples=2 \\(this Attributor has samples=3\\)"):
        hw.Attributor(model, task=hw.ClassificationTask(), samples=3, workdir=tmp_path / "a")
    hw.Attributor(model, task=hw.ClassificationTask(), workdir=tmp_path / "b")
    cfg = tmp_path / "b" / "config.json"
    import json

    saved = json.loads(cfg.read_text())
    del saved["samples"]  # as written before the option existed
    save_json(cfg, saved)
    hw.Attributor(model, task=hw.ClassificationTask(), workdir=tmp_path / "b")
