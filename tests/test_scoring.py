"""Scores against autograd gradients, decompositions and low-rank queries."""

from __future__ import annotations

import pytest
import torch

import headwater as hw
from _models import MLP, Conv1DMLP, SharedMLP, classification_data, lm_data, lm_queries, tiny_gpt2
from _reference import autograd_grads
from headwater.engine import LayerCapture
from headwater.layers import select_layers
from headwater.scoring import QueryGradients


@pytest.mark.parametrize("make", [MLP, Conv1DMLP, SharedMLP], ids=["linear", "conv1d", "shared"])
def test_identity_equals_autograd_gradient_dot_products(make):
    model = make().double()
    d_in = model.inp.in_features if hasattr(model, "inp") else 5
    train = classification_data(11, d_in=d_in)
    queries = classification_data(4, d_in=d_in, seed=8)
    task = hw.ClassificationTask()
    an = hw.Attributor(model, task=task, strategy="identity")
    got = an.scores(queries, train, batch_size=3, per_layer=True)
    gq = autograd_grads(model, task, queries, an.layers, measurement=True)
    gm = autograd_grads(model, task, train, an.layers)
    torch.testing.assert_close(got.values, gq @ gm.T)
    # per-layer scores are the layer blocks of the same dot product
    lo = 0
    for name, ad in an.layers.items():
        size = ad.out_features * ad.in_features
        torch.testing.assert_close(got.per_layer[name], gq[:, lo : lo + size] @ gm[:, lo : lo + size].T)
        lo += size


def test_identity_equals_autograd_on_gpt2_with_masked_prompts():
    model = tiny_gpt2()
    task = hw.LanguageModelingTask()
    train, queries = lm_data(7), lm_queries(3)
    an = hw.Attributor(model, task=task, strategy="identity", modules=None)
    got = an.scores(queries, train, batch_size=3)
    gq = autograd_grads(model, task, queries, an.layers, measurement=True)
    gm = autograd_grads(model, task, train, an.layers)
    torch.testing.assert_close(got.values, gq @ gm.T)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_per_layer_and_per_token_scores_sum_to_totals(strategy):
    model = tiny_gpt2()
    train, queries = lm_data(9), lm_queries(3)
    an = hw.Attributor(model, strategy=strategy, modules=None).fit(train, batch_size=4)
    res = an.scores(queries, train, batch_size=4, per_layer=True, per_token=True)
    torch.testing.assert_close(sum(res.per_layer.values()), res.values)
    torch.testing.assert_close(res.per_token.sum(-1), res.values)
    assert res.per_token.shape == (3, 9, max(len(x["input_ids"]) for x in train))
    # tokens beyond each sequence's length carry nothing
    for j, x in enumerate(train):
        assert res.per_token[:, j, len(x["input_ids"]) :].abs().max() == 0 if len(x["input_ids"]) < 10 else True


def test_per_token_on_a_shared_module_folds_every_use_onto_the_sequence():
    model = SharedMLP().double()
    task = hw.ClassificationTask()
    train = classification_data(6, d_in=4)
    an = hw.Attributor(model, task=task, strategy="ekfac").fit(train)
    res = an.scores(train[:2], train, per_token=True, per_layer=True)
    torch.testing.assert_close(res.per_token.sum(-1), res.values)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_self_influence_is_the_diagonal_of_symmetric_pairwise_scores(strategy):
    model = tiny_gpt2()
    train = lm_data(8)
    an = hw.Attributor(model, strategy=strategy, modules="mlp").fit(train, batch_size=3)
    pairwise = an.scores(train, train, batch_size=3).values  # queries = train, f = L
    torch.testing.assert_close(pairwise, pairwise.T, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(an.self_influence(train, batch_size=5), torch.diagonal(pairwise).double())


def test_query_rank_at_or_above_full_rank_is_exact():
    model = tiny_gpt2()
    train, queries = lm_data(8), lm_queries(3)
    an = hw.Attributor(model, modules="mlp").fit(train)
    full = an.scores(queries, train).values
    torch.testing.assert_close(an.scores(queries, train, query_rank=17).values, full)  # min(O, I) = 17


def test_rank_32_query_correlates_with_full_rank_on_a_tiny_lm():
    model = tiny_gpt2(vocab=60, d=64)
    train, queries = lm_data(24, vocab=60), lm_queries(4, vocab=60)
    an = hw.Attributor(model, modules="mlp").fit(train, batch_size=8)
    full = an.scores(queries, train, batch_size=8).values
    low = an.scores(queries, train, batch_size=8, query_rank=32)
    corr = torch.corrcoef(torch.stack([full.flatten(), low.values.flatten()]))[0, 1]
    assert corr > 0.99
    low_tok = an.scores(queries, train, batch_size=8, query_rank=32, per_token=True)
    torch.testing.assert_close(low_tok.values, low.values)
    torch.testing.assert_close(low_tok.per_token.sum(-1), low.values)


def test_low_rank_factored_and_dense_forms_agree():
    g = torch.Generator().manual_seed(0)
    n, s, i, o, q, r = 3, 5, 7, 6, 2, 3
    a = torch.randn(n, s, i, dtype=torch.float64, generator=g)
    gr = torch.randn(n, s, o, dtype=torch.float64, generator=g)
    p = torch.randn(q, o, i, dtype=torch.float64, generator=g)
    c = LayerCapture("x", a, gr, None)
    lr = QueryGradients.build(p, r)
    factored, tok = lr.scores(c, per_token=True)
    dense = QueryGradients(full=lr.u @ lr.v.mT)
    expected = torch.einsum("qoi,nso,nsi->qn", dense.full, gr, a)
    torch.testing.assert_close(factored, expected)
    torch.testing.assert_close(dense.scores(c, per_token=False)[0], expected)
    torch.testing.assert_close(dense.scores(c, per_token=True)[1], tok)
    # rank-r truncation is the best rank-r approximation (Eckart-Young): residual = tail singular values
    sv = torch.linalg.svdvals(p)
    torch.testing.assert_close(torch.linalg.matrix_norm(p - dense.full) ** 2, (sv[:, r:] ** 2).sum(1))


def test_top_and_bottom_order():
    res = hw.Scores(torch.tensor([[0.5, -2.0, 3.0, 1.0]]))
    top, bottom = res.top(2), res.bottom(2)
    assert top.indices.tolist() == [[2, 3]] and top.values.tolist() == [[3.0, 1.0]]
    assert bottom.indices.tolist() == [[1, 0]]
    assert res.top(10).indices.shape == (1, 4)


def test_layers_are_resolved_in_model_order():
    model = tiny_gpt2()
    names = list(select_layers(model, "mlp"))
    assert names == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]


@pytest.mark.parametrize("shape", [(2, 9, 5), (2, 5, 9)], ids=["tall", "wide"])
def test_low_rank_truncation_matches_the_svd(shape):
    p = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    r = 3
    lr = QueryGradients.build(p, r)
    u, s, vh = torch.linalg.svd(p)
    best = u[..., :r] @ torch.diag_embed(s[:, :r]) @ vh[:, :r]
    torch.testing.assert_close(lr.u @ lr.v.mT, best)


def test_sampled_labels_follow_the_model_distribution():
    from headwater.task import sample_categorical

    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).expand(200_000, 3)
    torch.manual_seed(0)
    freq = torch.bincount(sample_categorical(logits), minlength=3).double() / 200_000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=4e-3, rtol=0)
