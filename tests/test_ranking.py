"""Streaming top-k scoring: the same rankings, per-layer parts and statistics as the full [Q, N] matrix."""

from __future__ import annotations

import torch

import headwater as hw
from _models import lm_data, lm_queries, tiny_gpt2


def test_ranking_equals_the_full_matrix(tmp_path) -> None:
    an = hw.Attributor(tiny_gpt2(), modules="mlp").fit(lm_data(16), batch_size=4)
    queries, train = lm_queries(3), lm_data(23, seed=5)
    full = an.scores(queries, train, batch_size=4, per_layer=True)
    rk = an.rank(queries, train, k=5, batch_size=4, per_layer=True, values_path=tmp_path / "v.f32")
    top, bottom = full.top(5), full.bottom(5)
    assert torch.equal(rk.top.indices, top.indices) and torch.equal(rk.bottom.indices, bottom.indices)
    torch.testing.assert_close(rk.top.values, top.values, rtol=1e-12, atol=0)
    for name, layer in full.per_layer.items():
        torch.testing.assert_close(rk.top_layers[name], layer.gather(1, top.indices), rtol=1e-12, atol=0)
        torch.testing.assert_close(rk.bottom_layers[name], layer.gather(1, bottom.indices), rtol=1e-12, atol=0)
    v = full.values
    torch.testing.assert_close(rk.stats["mean"], v.mean(1))
    torch.testing.assert_close(rk.stats["std"], v.std(1))
    assert torch.equal(rk.stats["positive"], (v > 0).sum(1).double())
    torch.testing.assert_close(rk.values(), v.float())
    assert rk.top.values.shape == (3, 5)


def test_ranking_k_larger_than_the_data_keeps_everything() -> None:
    an = hw.Attributor(tiny_gpt2(), modules="mlp", strategy="identity")
    rk = an.rank(lm_queries(2), lm_data(3), k=10, batch_size=2)
    assert rk.top.indices.shape == (2, 3)
    assert sorted(rk.top.indices[0].tolist()) == [0, 1, 2]
