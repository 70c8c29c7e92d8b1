"""Contractions that do not depend on an optional package: every einsum has two operands, and
scores are the same with torch's opt_einsum path search switched off (the default install)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import headwater as hw
from _models import lm_data, lm_queries, tiny_gpt2
from headwater.scoring import low_rank_token_scores

SRC = Path(__file__).resolve().parents[1] / "src" / "headwater"


def test_no_einsum_in_the_package_has_more_than_two_operands() -> None:
    """A 3+-operand torch.einsum contracts left to right without opt_einsum (8-300x slower)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "einsum" and len(node.args) > 3:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def testlow_rank_token_scores_match_the_dense_definition() -> None:
    g = torch.Generator().manual_seed(0)
    a, gr = (
        torch.randn(3, 5, 7, generator=g, dtype=torch.float64),
        torch.randn(3, 5, 4, generator=g, dtype=torch.float64),
    )
    u, v = (
        torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 7, 3, generator=g, dtype=torch.float64),
    )
    p = u @ v.mT  # [Q, O, I]
    want = torch.stack([torch.stack([(gr[n] @ p[q] * a[n]).sum(-1) for n in range(3)]) for q in range(2)])
    torch.testing.assert_close(low_rank_token_scores(a, gr, u, v), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 2])
def test_scores_are_identical_with_opt_einsum_off(monkeypatch, rank) -> None:
    model = tiny_gpt2()
    an = hw.Attributor(model, fisher="empirical").fit(lm_data(8), batch_size=4)
    kwargs = dict(batch_size=4, query_rank=rank, per_layer=True, per_token=True)
    on = an.scores(lm_queries(2), lm_data(8), **kwargs)
    monkeypatch.setattr(torch.backends.opt_einsum, "enabled", False)
    off = an.scores(lm_queries(2), lm_data(8), **kwargs)
    assert torch.equal(on.values, off.values)
    assert torch.equal(on.per_token, off.per_token)
