"""Half precision: float16 and bfloat16 models fit and score, and agree with float32."""

from __future__ import annotations

import pytest
import torch

import headwater as hw
from _models import lm_data, lm_queries, tiny_gpt2
from headwater.errors import all_finite

VOCAB = 400


def _shifted_gpt2() -> torch.nn.Module:
    """A tiny GPT-2 (vocabulary 400) whose logits all carry a -4 offset (softmax, hence every
    gradient, is unchanged).

    A trained LM's logits are large and mostly negative; their float16 *sum* over a batch
    overflows although every logit is finite, which once failed every float16 fit.
    """
    model = tiny_gpt2(vocab=VOCAB, d=32, dtype=torch.float32)
    with torch.no_grad():
        model.transformer.ln_f.bias.zero_()[0] = 2.0
        model.lm_head.weight[:, 0] = -2.0
    return model


def test_all_finite_does_not_overflow_in_half_precision() -> None:
    t = torch.full((1000,), 60000.0, dtype=torch.float16)
    assert torch.isinf(t.sum())  # the old check would have called this non-finite
    assert all_finite(t)
    assert all_finite(torch.full((10,), 3e38, dtype=torch.bfloat16))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.float16))
    assert not all_finite(torch.tensor([1.0, float("inf")], dtype=torch.bfloat16))
    assert all_finite(torch.full((4,), 1e308, dtype=torch.float64))  # its sum overflows; every value is finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fisher", ["topk", "sampled"])
def test_half_precision_fits_correlate_with_float32(dtype: torch.dtype, fisher: str) -> None:
    train, queries = lm_data(24, vocab=VOCAB, seed=1), lm_queries(4, vocab=VOCAB)
    ref = hw.Attributor(_shifted_gpt2(), modules="mlp", fisher=fisher).fit(train, batch_size=8)
    want = ref.scores(queries, train, batch_size=8).values.double().flatten()
    an = hw.Attributor(_shifted_gpt2().to(dtype), modules="mlp", fisher=fisher).fit(train, batch_size=8)
    got = an.scores(queries, train, batch_size=8).values.double().flatten()
    assert torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([want, got]))[0, 1] > 0.95
