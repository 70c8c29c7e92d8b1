"""Hugging Face models end to end: GPT-2 (Conv1D), Llama (Linear), invariances, bf16."""

from __future__ import annotations

import copy

import torch

import headwater as hw
from _models import lm_data, lm_queries, tiny_gpt2, tiny_llama
from _reference import autograd_grads
from headwater.layers import conv1d_to_linear


def test_gpt2_conv1d_scores_equal_the_same_model_with_linear_layers():
    model = tiny_gpt2()
    linear = conv1d_to_linear(copy.deepcopy(model))
    train, queries = lm_data(10), lm_queries(3)
    results = []
    for m in (model, linear):
        an = hw.Attributor(m, strategy="ekfac", modules=None, fisher="empirical").fit(train, batch_size=4)
        results.append(an.scores(queries, train, batch_size=4, per_layer=True))
    torch.testing.assert_close(results[0].values, results[1].values)
    assert {k: v.shape for k, v in results[0].per_layer.items()} == {
        k: v.shape for k, v in results[1].per_layer.items()
    }


def test_llama_runs_end_to_end_and_identity_matches_autograd():
    model = tiny_llama()
    train, queries = lm_data(8), lm_queries(3)
    an = hw.Attributor(model, modules="mlp", strategy="ekfac").fit(train, batch_size=4)
    assert sorted({n.rsplit(".", 1)[1] for n in an.layers}) == ["down_proj", "gate_proj", "up_proj"]
    res = an.scores(queries, train, batch_size=4, query_rank=8, per_token=True)
    assert torch.isfinite(res.values).all() and res.values.abs().sum() > 0
    task = hw.LanguageModelingTask()
    ident = hw.Attributor(model, modules="mlp", strategy="identity").scores(queries, train, batch_size=4)
    gq = autograd_grads(model, task, queries, an.layers, measurement=True)
    gm = autograd_grads(model, task, train, an.layers)
    torch.testing.assert_close(ident.values, gq @ gm.T)


def test_batch_size_and_right_padding_do_not_change_results():
    model = tiny_gpt2()
    train, queries = lm_data(12), lm_queries(3)
    runs = []
    for bs in (1, 5, 12):
        an = hw.Attributor(model, modules=None, fisher="empirical").fit(train, batch_size=bs)
        runs.append((an.scores(queries, train, batch_size=bs, per_token=True), an.self_influence(train, batch_size=bs)))
    for res, si in runs[1:]:
        torch.testing.assert_close(res.values, runs[0][0].values)
        torch.testing.assert_close(res.per_token, runs[0][0].per_token)
        torch.testing.assert_close(si, runs[0][1])
    # explicit padding that arrives with the examples is dropped
    padded = [
        {
            "input_ids": torch.cat([x["input_ids"], torch.zeros(3, dtype=torch.long)]),
            "attention_mask": torch.cat([torch.ones(len(x["input_ids"])), torch.zeros(3)]),
        }
        for x in train
    ]
    an = hw.Attributor(model, modules=None, fisher="empirical").fit(padded, batch_size=5)
    torch.testing.assert_close(an.scores(queries, padded, batch_size=5).values, runs[0][0].values)


def test_bf16_autocast_scores_correlate_with_fp32():
    model = tiny_gpt2(vocab=60, d=32, dtype=torch.float32)
    train, queries = lm_data(16, vocab=60), lm_queries(4, vocab=60)
    an = hw.Attributor(model, modules="mlp", fisher="empirical").fit(train, batch_size=8)
    ref = an.scores(queries, train, batch_size=8).values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        an16 = hw.Attributor(model, modules="mlp", fisher="empirical").fit(train, batch_size=8)
        low = an16.scores(queries, train, batch_size=8).values
    assert low.dtype == torch.float32  # accumulation stays in fp32
    assert torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1] > 0.95


def test_bf16_model_accumulates_in_fp32():
    model = tiny_gpt2(vocab=60, d=32, dtype=torch.float32)
    train, queries = lm_data(16, vocab=60), lm_queries(4, vocab=60)
    ref = hw.Attributor(model, modules="mlp", fisher="empirical").fit(train).scores(queries, train).values
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    an = hw.Attributor(model16, modules="mlp", fisher="empirical").fit(train)
    assert an.curvature["transformer.h.0.mlp.c_fc"].lam.dtype == torch.float64
    low = an.scores(queries, train).values
    assert low.dtype == torch.float32
    assert torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1] > 0.9


def test_float64_model_stays_float64():
    model = tiny_gpt2()
    train = lm_data(6)
    an = hw.Attributor(model, modules="mlp").fit(train)
    assert an.scores(lm_queries(2), train).values.dtype == torch.float64


def test_sampled_fisher_is_reproducible_and_seeded():
    model = tiny_gpt2()
    train = lm_data(10)
    lam = lambda seed: (
        hw.Attributor(model, modules="mlp", seed=seed).fit(train).curvature["transformer.h.0.mlp.c_fc"].lam
    )  # noqa: E731
    torch.testing.assert_close(lam(0), lam(0))
    assert not torch.allclose(lam(0), lam(1))


def test_model_state_is_left_as_found():
    model = tiny_gpt2()
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    an = hw.Attributor(model, modules="mlp").fit(lm_data(4))
    an.scores(lm_queries(1), lm_data(4))
    assert model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_float64_losses_are_not_rounded_through_float32():
    from torch import nn as tnn

    model = tnn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    assert hw.ClassificationTask().loss(model, (x, y)).dtype == torch.float64
    lm = tiny_gpt2()
    batch = hw.LanguageModelingTask().collate(lm_data(2))
    assert hw.LanguageModelingTask().loss(lm, batch).dtype == torch.float64
