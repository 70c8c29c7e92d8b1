"""A ``torch.compile``d model: the capture hooks run between its compiled regions, same numbers."""

from __future__ import annotations

import pytest
import torch

import headwater as hw
from _models import lm_data, lm_queries, tiny_gpt2

pytest.importorskip("torch._dynamo")


def test_a_compiled_model_scores_as_the_eager_one():
    """EK-FAC fit and scores of ``torch.compile(model)`` against the eager model's, float64.

    The empirical Fisher keeps pseudo-label sampling out of it, so any difference is the capture's;
    sequences of one length keep recompilation (and the test's time) down.
    """
    torch._dynamo.reset()
    model, train, queries = tiny_gpt2(), lm_data(8, lo=6, hi=6), lm_queries(2)
    kw = dict(modules="mlp", fisher="empirical")
    eager = hw.Attributor(model, **kw).fit(train, batch_size=4).scores(queries, train, batch_size=4, per_layer=True)
    compiled = torch.compile(model)
    an = hw.Attributor(compiled, **kw)
    assert [n.removeprefix("_orig_mod.") for n in an.layers] == list(hw.Attributor(model, **kw).layers)
    got = an.fit(train, batch_size=4).scores(queries, train, batch_size=4, per_layer=True)
    torch.testing.assert_close(got.values, eager.values, rtol=1e-9, atol=1e-12)
    for a, b in zip(got.per_layer.values(), eager.per_layer.values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)  # no hook left behind


def test_a_model_compiled_before_the_hooks_is_refused_not_misread():
    """torch.compile does not guard on hooks: a graph compiled before the Attributor runs without them.

    Nothing would be captured; the pass must refuse with the cause and the fix, not return zeros.
    """
    torch._dynamo.reset()
    model, train = tiny_gpt2(), lm_data(4, lo=6, hi=6)
    compiled = torch.compile(model)
    task = hw.LanguageModelingTask()
    batch = task.collate(train)
    compiled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # compiled without hooks
    with pytest.raises(RuntimeError, match=r"compiled \(torch.compile\) and run before.*torch._dynamo.reset"):
        hw.Attributor(compiled, modules="mlp", fisher="empirical").fit(train, batch_size=4)
    torch._dynamo.reset()
