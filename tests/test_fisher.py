"""Fisher estimators: several draws per forward, and the top-m-plus-tail estimator.

References are exact and independent of the estimators: ``fisher="exact"`` (itself checked
against dense Gauss-Newton in test_curvature), and for a language model the dense per-sequence
Gauss-Newton from ``headwater.gauss_newton`` (jvp/vjp, no capture), read off in a
fixed Kronecker eigenbasis.
"""

from __future__ import annotations

import pytest
import torch

import headwater as hw
import headwater.task as task_module
from _models import MLP, classification_data, lm_data, regression_data, tiny_gpt2
from headwater.curvature import LambdaAccumulator
from headwater.gauss_newton import ParameterSpace, dense_gauss_newton
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
    new = hw.Attributor(model, task=task, samples=1, seed=3, **kw).fit(data, batch_size=4)
    old = hw.Attributor(model, task=ref_task, seed=3, **kw).fit(data, batch_size=4)
    for n in new.layers:
        for key, value in new.curvature[n].tensors().items():
            assert torch.equal(value, old.curvature[n].tensors()[key]), (n, key)


class _DefaultRegression(hw.RegressionTask):
    """Draws through ``Task.sampled_losses``' default: one forward pass per draw."""

    sampled_losses = Task.sampled_losses


@pytest.mark.parametrize("task, data, samples", [(hw.ClassificationTask(), classification_data(64), 400),
                                                 (hw.RegressionTask(), regression_data(64), 400),
                                                 (_DefaultRegression(), regression_data(64), 25)])  # fmt: skip
def test_many_samples_converge_to_the_exact_fisher(task, data, samples):
    model = MLP().double()
    exact = hw.Attributor(model, task=task, fisher="exact").fit(data, batch_size=64)
    one = _rel_error(hw.Attributor(model, task=task, samples=1).fit(data, batch_size=64), exact)
    many = _rel_error(hw.Attributor(model, task=task, samples=samples).fit(data, batch_size=64), exact)
    assert many < one * 2.5 / samples**0.5  # error ~ 1/sqrt(samples)


def test_topk_is_the_exact_fisher_once_it_covers_every_class():
    model, data = MLP().double(), classification_data(40)
    task = hw.ClassificationTask()
    exact = hw.Attributor(model, task=task, fisher="exact").fit(data, batch_size=8)
    topk = hw.Attributor(model, task=task, fisher="topk", samples=3).fit(data, batch_size=8)
    assert _rel_error(topk, exact) < 1e-10


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
        an = hw.Attributor(model, task=task, strategy="diagonal", fisher="topk", samples=2, seed=seed)
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

    def estimate(fisher: str, samples: int, seed: int) -> torch.Tensor:
        an = hw.Attributor(model, modules=modules, fisher=fisher, samples=samples, seed=seed)
        acc = LambdaAccumulator({name: op})
        an._fit_pass(acc, data, 8, "eigenvalue correction", "test", False)
        return acc.ekfac(name).lam

    return exact, estimate


@pytest.mark.parametrize("samples, seeds", [(4, 80), (40, 30)])
def test_topk_lambda_is_unbiased_on_a_multi_token_lm(lm_lambda, samples, seeds):
    """The random signs cancel cross-token terms: the seed average approaches the dense GN's Lambda.

    samples=40 = the vocabulary: every token enters exactly and only the signs are random.
    """
    exact, estimate = lm_lambda
    bias, noise = _bias_and_noise(exact, torch.stack([estimate("topk", samples, s) for s in range(seeds)]))
    assert bias < noise


def test_topk_without_random_signs_would_be_biased(lm_lambda, monkeypatch):
    """The check above has power: dropping the signs leaves the cross-token terms in."""
    exact, estimate = lm_lambda
    signed = task_module._topk_tail
    monkeypatch.setattr(task_module, "_topk_tail", lambda logits, k: (lambda y, w: (y, w.abs()))(*signed(logits, k)))
    bias, noise = _bias_and_noise(exact, torch.stack([estimate("topk", 40, s) for s in range(30)]))
    assert bias > 2 * noise


def test_bad_samples_raise_clear_errors():
    model = MLP().double()
    with pytest.raises(ValueError, match="samples must be a positive integer, got 0"):
        hw.Attributor(model, task=hw.ClassificationTask(), samples=0)
    with pytest.raises(ValueError, match="samples=4 draws pseudo-labels, but fisher='exact' draws none"):
        hw.Attributor(model, task=hw.ClassificationTask(), fisher="exact", samples=4)
    with pytest.raises(NotImplementedError, match="fisher='topk' needs RegressionTask.topk_losses"):
        hw.Attributor(model, task=hw.RegressionTask(), fisher="topk").fit(regression_data(4))


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
    cfg.write_text(json.dumps(saved))
    hw.Attributor(model, task=hw.ClassificationTask(), workdir=tmp_path / "b")
