"""Damping: refused when it cannot be right, and never zero where the curvature is."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import headwater as hw
from _models import MLP, classification_data, lm_data, lm_queries, tiny_gpt2
from headwater.errors import ZeroCurvatureWarning
from headwater.index import build_index, query_index


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, -1.0])
def test_non_finite_or_negative_damping_is_refused(bad: float, tmp_path) -> None:
    an = hw.Attributor(tiny_gpt2(), modules="mlp").fit(lm_data(4))
    with pytest.raises(ValueError, match="damping must be None or a non-negative number, got"):
        an.scores(lm_queries(1), lm_data(4), damping=bad)
    with pytest.raises(ValueError, match="damping must be None or a non-negative number, got"):
        an.self_influence(lm_data(4), damping=bad)
    build_index(an, lm_data(4), dim=4, path=tmp_path)
    with pytest.raises(ValueError, match="damping must be None or a non-negative number, got"):
        query_index(an, lm_queries(1), tmp_path, damping=bad)


def test_damping_of_the_wrong_type_is_a_type_error() -> None:
    an = hw.Attributor(tiny_gpt2(), modules="mlp").fit(lm_data(4))
    with pytest.raises(TypeError, match="damping must be None or a non-negative number, got '0.1'"):
        an.scores(lm_queries(1), lm_data(4), damping="0.1")


def _certain_classifier() -> torch.nn.Module:
    """An MLP whose logits differ by ~1e3: softmax is exactly one-hot in float64, so every
    pseudo-gradient (and the training loss's gradient) is exactly 0."""
    model = MLP().double()
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc2.bias.copy_(torch.tensor([1000.0, 0.0, 0.0]))
    return model


def test_a_zero_loss_model_warns_at_fit_time_and_keeps_damping_positive() -> None:
    data = [(x, torch.tensor(0)) for x, _ in classification_data(12)]
    an = hw.Attributor(_certain_classifier(), task=hw.ClassificationTask(), fisher="sampled")
    with pytest.warns(ZeroCurvatureWarning, match=r"2 of 2 layers have zero curvature on the fit data"):
        an.fit(data, batch_size=4)
    assert all(d > 0 and math.isfinite(d) for d in an.damping().values())
    sc = an.scores(data[:2], data, batch_size=4)  # used to raise NonFiniteError "... try float32"
    assert torch.isfinite(sc.values).all()
    assert torch.equal(sc.values, torch.zeros_like(sc.values))  # zero loss: zero gradients, zero influence
    with pytest.raises(ValueError, match="damping=0 divides by zero: layer 'fc1' has zero eigenvalues"):
        an.scores(data[:2], data, damping=0.0)


def test_one_flat_layer_borrows_the_smallest_other_damping() -> None:
    from headwater.curvature import DiagonalCurvature, resolve_damping

    curvature = {
        "a": DiagonalCurvature(torch.full((2, 2), 4.0, dtype=torch.float64)),
        "b": DiagonalCurvature(torch.full((2, 2), 2.0, dtype=torch.float64)),
        "flat": DiagonalCurvature(torch.zeros(2, 2, dtype=torch.float64)),
    }
    assert resolve_damping(curvature, None) == pytest.approx({"a": 0.4, "b": 0.2, "flat": 0.2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from headwater.curvature import warn_zero_curvature

        warn_zero_curvature(curvature)
    assert [str(w.message) for w in caught][0].startswith("1 of 3 layers have zero curvature")
    assert "use damping 0.2 instead (the smallest other layer's)" in str(caught[0].message)
