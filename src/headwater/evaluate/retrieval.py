"""Planted-fact retrieval: do the top-scored documents include the ones that state the fact?

Given scores [Q, N] and, per query, the set of training documents known to be responsible
(on the demo corpus: the documents that state the query's planted fact), rank the documents
by score, most positive first (positive = upweighting the document lowers the query's loss,
i.e. makes the completion more likely), and report

- ``recall@k``: the fraction of a query's relevant documents among its top k, averaged over
  queries;
- ``MRR``: the mean over queries of 1 / (rank of the first relevant document), ranks from 1.

Queries with no relevant document are skipped and counted in ``skipped``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["RetrievalResult", "retrieval", "relevant_from_labels"]


@dataclass
class RetrievalResult:
    """recall@k for each k asked for, MRR, and the per-query first-hit ranks (1-based)."""

    recall: dict[int, float]
    mrr: float
    first_rank: torch.Tensor  # [Q'], over the queries that have relevant documents
    skipped: int = 0
    per_query_recall: dict[int, torch.Tensor] = field(default_factory=dict)


def relevant_from_labels(doc_labels: Sequence[Any], query_labels: Sequence[Any]) -> list[set[int]]:
    """Relevant sets from labels: document i is relevant to query q when their labels are equal.

    ``None`` never matches (documents that state no fact).
    """
    index: dict[Any, set[int]] = {}
    for i, lab in enumerate(doc_labels):
        if lab is not None:
            index.setdefault(lab, set()).add(i)
    return [set(index.get(lab, set())) if lab is not None else set() for lab in query_labels]


def retrieval(scores: Any, relevant: Sequence[Iterable[int]], ks: Sequence[int] = (1, 5, 10)) -> RetrievalResult:
    """recall@k and MRR of ``relevant`` (one collection of document indices per query) under ``scores``."""
    values = torch.as_tensor(_values(scores))
    if values.ndim != 2:
        raise ValueError(f"scores must be [Q, N], got shape {tuple(values.shape)}")
    q, n = values.shape
    if len(relevant) != q:
        raise ValueError(f"relevant has {len(relevant)} sets but scores have {q} queries; give one set per query")
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    order = torch.argsort(values, dim=1, descending=True, stable=True)
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(n).expand(q, n))  # rank_of[q, i] = 0-based rank of doc i
    first, per_recall, skipped = [], {k: [] for k in ks}, 0
    for j, rel in enumerate(relevant):
        rel = sorted({int(i) for i in rel})
        if not rel:
            skipped += 1
            continue
        if rel[0] < 0 or rel[-1] >= n:
            raise ValueError(f"query {j}: relevant index {rel[-1] if rel[-1] >= n else rel[0]} is outside 0..{n - 1}")
        ranks = rank_of[j, rel]
        first.append(int(ranks.min()) + 1)
        for k in ks:
            per_recall[k].append(float((ranks < k).sum()) / len(rel))
    if not first:
        raise ValueError("no query has a relevant document; retrieval metrics are undefined")
    first_rank = torch.tensor(first)
    per = {k: torch.tensor(v) for k, v in per_recall.items()}
    return RetrievalResult(
        recall={k: float(v.mean()) for k, v in per.items()},
        mrr=float((1.0 / first_rank.double()).mean()),
        first_rank=first_rank,
        skipped=skipped,
        per_query_recall=per,
    )


def _values(scores: Any) -> Any:
    """The [Q, N] matrix of a ``Scores`` (or anything with a tensor ``.values``), else ``scores`` itself."""
    if isinstance(scores, (torch.Tensor, np.ndarray)):
        return scores
    return getattr(scores, "values", scores)
