"""BM25 candidate filtering against a brute-force reference, and filtered scoring against exact scoring."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import headwater as hw
from _models import lm_data, lm_queries, tiny_gpt2
from headwater.filtering import BM25Index, scores_with_candidates, token_ids, top_n


def _random_corpus(seed: int, n: int = 60, vocab: int = 30, max_len: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def _brute_force(docs: list[list[int]], query: list[int], k1: float, b: float) -> list[float]:
    """The module docstring's formula, written out with sets and dicts, one document at a time."""
    c = len(docs)
    count: dict[int, int] = {}
    for d in docs:
        for t in set(d):
            count[t] = count.get(t, 0) + 1
    avgdl = sum(len(d) for d in docs) / c
    out = []
    for d in docs:
        present = set(query) & set(d)
        idf_sum = sum(math.log((c - count[t] + 0.5) / (count[t] + 0.5) + 1) for t in present)
        out.append(idf_sum * (k1 + 1) / (1 + k1 * (1 - b + b * len(d) / avgdl)))
    return out


@pytest.mark.parametrize("b", [0.75, 0.0, 0.3])
def test_scores_match_brute_force_bm25(b):
    docs = _random_corpus(0)
    index = BM25Index(docs, b=b)
    rng = random.Random(1)
    for _ in range(5):
        query = [rng.randrange(35) for _ in range(rng.randint(1, 8))]  # repeats and ids absent from the corpus
        np.testing.assert_allclose(index.scores(query), _brute_force(docs, query, 1.5, b), rtol=1e-12)


def test_score_is_the_sum_of_idfs_of_present_query_tokens():
    # b = 0, or documents of equal length (the paper's fixed-length sequences): the length factor is 1
    docs = [[1, 2, 2, 3], [2, 4, 5, 6], [7, 7, 7, 7], [1, 3, 5, 8]]
    c = len(docs)
    df = {1: 2, 2: 2, 3: 2, 4: 1, 5: 2, 6: 1, 7: 1, 8: 1}
    idf = {t: math.log((c - n + 0.5) / (n + 0.5) + 1) for t, n in df.items()}
    query = [3, 2, 2, 9, 5]
    expected = [idf[2] + idf[3], idf[2] + idf[5], 0.0, idf[3] + idf[5]]
    np.testing.assert_allclose(BM25Index(docs).scores(query), expected, rtol=1e-12)
    uneven = docs + [[2]]
    c = len(uneven)
    idf2 = math.log((c - 3 + 0.5) / (3 + 0.5) + 1)
    assert BM25Index(uneven, b=0.0).scores([2])[4] == pytest.approx(idf2, rel=1e-12)


def test_flat_and_list_builds_agree_and_leave_the_input_untouched():
    docs = _random_corpus(2)
    tokens = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    before = tokens.copy()
    flat = BM25Index.from_flat(tokens, offsets)
    np.testing.assert_array_equal(tokens, before)
    others = [BM25Index(docs), BM25Index([np.asarray(d) for d in docs]), BM25Index([torch.tensor(d) for d in docs])]
    for other in others:
        np.testing.assert_array_equal(other.scores([1, 4, 9]), flat.scores([1, 4, 9]))


def test_top_n_breaks_ties_by_lower_index():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, 200).astype(float)  # many ties
    for n in (1, 7, 50, 200, 500):
        expected = sorted(range(200), key=lambda i: (-scores[i], i))[:n]
        np.testing.assert_array_equal(top_n(scores, n), expected)


def test_candidates_are_deterministic_with_duplicate_documents():
    base = _random_corpus(3, n=20)
    docs = base + base + base  # every document three times: every score is tied at least three ways
    queries = [[1, 2, 3], [3, 2, 1, 1], [29, 0], [99]]
    first = BM25Index(docs).candidates(queries, 10)
    again = BM25Index([list(d) for d in docs]).candidates(queries, 10)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first[0], first[1])  # token order and repeats in the query do not matter
    np.testing.assert_array_equal(first[3], np.arange(10))  # nothing matches: lowest indices
    scores = BM25Index(docs).scores(queries[0])
    np.testing.assert_array_equal(first[0], sorted(range(60), key=lambda i: (-scores[i], i))[:10])


def test_token_ids_drop_padding():
    data = lm_data(7)
    ids = token_ids(data, hw.LanguageModelingTask(), batch_size=3)
    assert len(ids) == 7
    for got, item in zip(ids, data, strict=True):
        np.testing.assert_array_equal(got, item["input_ids"].numpy())


def _scores_on_candidates(per_token: bool):
    model = tiny_gpt2()
    train, queries = lm_data(14), lm_queries(3)
    an = hw.Attributor(model, strategy="ekfac", modules="mlp", fisher="empirical").fit(train, batch_size=4)
    kw = dict(batch_size=4, per_layer=True, per_token=per_token)
    return an, train, queries, an.scores(queries, train, **kw), scores_with_candidates(an, queries, train, 5, **kw)


def test_filtered_scores_equal_exact_scores_restricted_to_candidates():
    an, train, queries, exact, res = _scores_on_candidates(per_token=True)
    index = BM25Index(token_ids(train, an.task))
    chosen = index.candidates(token_ids(queries, an.task), 5)
    mask = torch.zeros_like(exact.values, dtype=torch.bool)
    for q, c in enumerate(chosen):
        mask[q, torch.from_numpy(c)] = True
    assert torch.equal(res.mask, mask)
    assert res.meta["candidates"] == 5 and int(mask.sum()) == 15
    zero = torch.zeros((), dtype=exact.values.dtype)
    torch.testing.assert_close(res.values, torch.where(mask, exact.values, zero))
    for name, v in exact.per_layer.items():
        torch.testing.assert_close(res.per_layer[name], torch.where(mask, v, zero))
    t = res.per_token.shape[2]  # the subset may have a shorter longest sequence than the full set
    torch.testing.assert_close(res.per_token, torch.where(mask[..., None], exact.per_token[..., :t], zero))
    assert not exact.per_token[..., t:][mask].any()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: BM25Index([]), ValueError, "docs is empty"),
        (lambda: BM25Index("abc"), TypeError, "docs must be a list"),
        (lambda: BM25Index([[1.5, 2.0]]), TypeError, "integer token ids"),
        (lambda: BM25Index([np.array([0.5])]), TypeError, "integer token ids"),
        (lambda: BM25Index([[1, -2]]), ValueError, "non-negative"),
        (lambda: BM25Index([[1]], k1=-1), ValueError, "k1 must be"),
        (lambda: BM25Index([[1]], b=2), ValueError, "b must be"),
        (lambda: BM25Index.from_flat(np.array([1, 2]), np.array([0, 3])), ValueError, "offsets must be 1-D"),
        (lambda: BM25Index.from_flat(np.array([1, 2]), np.array([0, 2, 1, 2])), ValueError, "non-decreasing"),
        (lambda: BM25Index.from_flat(np.array([0.5]), np.array([0, 1])), TypeError, "1-D integer array"),
        (lambda: BM25Index([[1]]).candidates([[1]], 0), ValueError, "n must be a positive integer"),
        (lambda: BM25Index([[1]]).candidates(5, 1), TypeError, "queries must be a list"),
        (lambda: token_ids([(torch.zeros(2), torch.tensor(0))], hw.ClassificationTask()), ValueError, "input_ids"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_scores_with_candidates_checks_its_index():
    model = tiny_gpt2()
    train, queries = lm_data(4), lm_queries(1)
    an = hw.Attributor(model, strategy="identity", modules="mlp")
    with pytest.raises(ValueError, match="index covers 3 documents"):
        scores_with_candidates(an, queries, train, 2, index=BM25Index([[1], [2], [3]]))
    with pytest.raises(TypeError, match="index must be"):
        scores_with_candidates(an, queries, train, 2, index=[[1]])
    with pytest.raises(ValueError, match="candidates must be"):
        scores_with_candidates(an, queries, train, 0)


def test_attributor_candidates_argument_ranks_only_candidates():
    an, train, queries, exact, res = _scores_on_candidates(per_token=False)
    via_api = an.scores(queries, train, batch_size=4, per_layer=True, candidates=5)
    torch.testing.assert_close(via_api.values, res.values)
    top = via_api.top(8)  # more than the 5 candidates: the rest are -inf, never a non-candidate's 0
    for q in range(len(queries)):
        picked = top.indices[q][torch.isfinite(top.values[q])]
        assert picked.numel() == 5 and via_api.mask[q, picked].all()


def test_fewer_candidates_than_k_rank_only_scored_sequences() -> None:
    from headwater.scoring import Scores

    values = torch.tensor([[3.0, 0.0, -1.0, 0.0, 2.0], [0.0, 1.0, 0.0, -2.0, 5.0]])
    mask = torch.tensor([[True, False, True, False, True], [False, True, False, True, True]])
    sc = Scores(values, mask=mask)
    top, bottom = sc.top(10), sc.bottom(10)
    assert top.indices.tolist() == [[0, 4, 2], [4, 1, 3]]
    assert bottom.indices.tolist() == [[2, 4, 0], [3, 1, 4]]
    assert torch.isfinite(top.values).all() and torch.isfinite(bottom.values).all()
