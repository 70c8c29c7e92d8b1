"""Candidate filtering: the paper's modified BM25 over model-tokenizer tokens (section 3.2.1).

Scoring every training sequence against every query costs one backward pass per sequence.
Grosse et al. (2023) first rank the training set by a cheap lexical score and give EK-FAC only
the top N (10,000 in the paper) per query. The lexical score is Okapi BM25 with two changes:
terms are the model's own token ids, and term frequency is binary (present or not), so a token
repeated fifty times in a boilerplate sequence does not dominate.

For query q and document d, with C documents, count(t) the number of documents holding token t,
|d| the number of tokens in d and avgdl their mean::

    IDF(t)   = log((C - count(t) + 0.5) / (count(t) + 0.5) + 1)
    score    = sum_{t in set(q), t in d} IDF(t) * (k1 + 1) / (1 + k1 * (1 - b + b * |d| / avgdl))

with k1 = 1.5 (the paper's value) and b = 0.75 (standard BM25). The paper's sequences all have
the same length (2048 tokens), so its length factor is 1 and its score is exactly the sum of the
IDFs of the query tokens present in the sequence; ours reduces to that too whenever the lengths
are equal, and for any lengths with ``b=0``. We keep b = 0.75 by default because short documents
of varying length are the common case here, and without it longer documents win simply by
holding more distinct tokens. Query tokens count once each (binary on both sides).

Because term frequency is binary, the length factor does not depend on the term, so

    score(q, d) = c_d * sum_{t in set(q) & d} IDF(t),    c_d = (k1 + 1) / (1 + k1 * (1 - b + b |d| / avgdl))

and the index is just the posting lists (a CSC matrix's row indices, int32) plus c_d and IDF.
A query gathers its terms' posting lists and adds their IDFs with one ``np.bincount``: no Python
loop over documents. A million 20-60 token documents (vocab 50k) give a 148 MiB index, built in
about 1.5 s, queried in 10-20 ms; ``benchmarks/bm25_scale.py`` measures it.

Example::

    from headwater.filtering import BM25Index, token_ids, scores_with_candidates
    index = BM25Index(token_ids(train, an.task))
    top = index.candidates(token_ids(queries, an.task), n=10_000)   # [Q] arrays of indices
    res = scores_with_candidates(an, queries, train, candidates=10_000, index=index)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Subset

from .data import check_data
from .scoring import Scores
from .task import Task
from .validation import check_int

__all__ = ["BM25Index", "token_ids", "top_n", "scores_with_candidates"]

K1 = 1.5  # the paper's value
B = 0.75  # standard BM25; irrelevant for the paper's fixed-length sequences (see module docstring)


def _as_ids(doc: Any, where: str) -> np.ndarray:
    """One document or query as a 1-D int64 array of token ids."""
    if isinstance(doc, torch.Tensor):
        doc = doc.detach().cpu().numpy()
    arr = np.asarray(doc)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{where} must be a 1-D sequence of integer token ids, got dtype {arr.dtype}, shape {arr.shape}"
        )
    return arr.astype(np.int64, copy=False)


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest scores, highest first; equal scores go to the lower index.

    O(N) selection with ``np.partition`` and a sort of only the n winners, so a ranking over a
    million documents costs milliseconds. Ties at the cut-off are resolved by index too, so the
    set (not only its order) is deterministic.
    """
    scores = np.asarray(scores)
    n = min(check_int(n, "n"), scores.shape[0])
    if n == scores.shape[0]:
        chosen = np.arange(n)
    else:
        kth = np.partition(scores, scores.shape[0] - n)[scores.shape[0] - n]  # the n-th largest value
        above = np.flatnonzero(scores > kth)
        tied = np.flatnonzero(scores == kth)[: n - above.shape[0]]
        chosen = np.concatenate([above, tied])
    order = np.lexsort((chosen, -scores[chosen]))  # primary: score descending, then index ascending
    return chosen[order]


class BM25Index:
    """Posting lists of a tokenized corpus, scored with the paper's binary-presence BM25.

    Parameters
    ----------
    docs : list of token-id sequences (lists, numpy arrays or 1-D tensors), one per document
    k1, b : BM25 parameters (the paper's k1 = 1.5; b = 0.75, see the module docstring)
    """

    def __init__(self, docs: Sequence[Any], k1: float = K1, b: float = B):
        if isinstance(docs, (str, bytes)) or not hasattr(docs, "__len__"):
            raise TypeError(f"docs must be a list of token-id sequences, got {type(docs).__name__}")
        if len(docs) == 0:
            raise ValueError("docs is empty; give at least one document")
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        if all(isinstance(d, np.ndarray) and d.ndim == 1 and np.issubdtype(d.dtype, np.integer) for d in docs):
            tokens = np.concatenate(docs).astype(np.int64, copy=False)
        elif all(isinstance(d, list) for d in docs):
            # one C-level pass over every token; read as float64 (exact below 2**53) so that a
            # non-integer id is caught instead of silently truncated
            try:
                flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.float64, count=int(lengths.sum()))
            except (TypeError, ValueError) as e:
                raise TypeError(f"docs must hold integer token ids ({e})") from e
            if not np.array_equal(flat, np.floor(flat)):
                bad = flat[flat != np.floor(flat)][0]
                raise TypeError(f"docs must hold integer token ids, found {bad}")
            tokens = flat.astype(np.int64)
        else:
            tokens = np.concatenate([_as_ids(d, f"docs[{i}]") for i, d in enumerate(docs)] + [np.zeros(0, np.int64)])
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._build(tokens, offsets, k1, b)

    @classmethod
    def from_flat(cls, tokens: np.ndarray, offsets: np.ndarray, k1: float = K1, b: float = B) -> BM25Index:
        """Build from all documents' tokens concatenated, and offsets [C + 1] into them.

        The fastest path for large corpora: no per-document Python objects at all.
        """
        tokens, offsets = np.asarray(tokens), np.asarray(offsets)
        if offsets.ndim != 1 or offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != tokens.shape[0]:
            raise ValueError(
                f"offsets must be 1-D, start at 0 and end at len(tokens)={tokens.shape[0]}; got shape "
                f"{offsets.shape} starting {offsets[:1]} ending {offsets[-1:]}"
            )
        if np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must be non-decreasing (each document's start <= its end)")
        if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
            raise TypeError(f"tokens must be a 1-D integer array, got dtype {tokens.dtype}, shape {tokens.shape}")
        self = cls.__new__(cls)
        self._build(tokens, offsets.astype(np.int64), k1, b)
        return self

    def _build(self, tokens: np.ndarray, offsets: np.ndarray, k1: float, b: float) -> None:
        if not (isinstance(k1, (int, float)) and k1 >= 0):
            raise ValueError(f"k1 must be a non-negative number, got {k1!r}")
        if not (isinstance(b, (int, float)) and 0 <= b <= 1):
            raise ValueError(f"b must be a number in [0, 1], got {b!r}")
        if tokens.size and tokens.min() < 0:
            raise ValueError(f"token ids must be non-negative, found {tokens.min()}")
        n_docs = offsets.shape[0] - 1
        vocab = int(tokens.max()) + 1 if tokens.size else 1
        # [C, V] presence matrix; bool data makes summing duplicates a logical or. The data and the
        # CSR copy are transient: the index keeps the CSC row indices (int32) only. astype copies, which
        # matters: sum_duplicates edits its arrays in place and must not touch the caller's tokens.
        idx_dtype = np.int32 if max(n_docs, vocab, tokens.size) < 2**31 - 1 else np.int64
        m = sp.csr_matrix(
            (np.ones(tokens.shape[0], bool), tokens.astype(idx_dtype), offsets.astype(idx_dtype)),
            shape=(n_docs, vocab),
        )
        m.sum_duplicates()
        m = m.tocsc()  # posting lists: column t holds the (sorted) documents containing t
        self.indptr = m.indptr.astype(np.int64)
        self.postings = m.indices
        del m
        self.n_docs = n_docs
        self.vocab_size = vocab
        self.k1, self.b = float(k1), float(b)
        self.lengths = np.diff(offsets)
        self.doc_freq = np.diff(self.indptr)
        self.idf = np.log((n_docs - self.doc_freq + 0.5) / (self.doc_freq + 0.5) + 1.0)
        avgdl = self.lengths.mean() if self.lengths.sum() else 1.0
        self.length_factor = (k1 + 1.0) / (1.0 + k1 * (1.0 - b + b * self.lengths / avgdl))

    def __len__(self) -> int:
        return self.n_docs

    @property
    def nbytes(self) -> int:
        """Memory held by the index arrays."""
        arrays = (self.indptr, self.postings, self.lengths, self.doc_freq, self.idf, self.length_factor)
        return sum(a.nbytes for a in arrays)

    def scores(self, query: Any) -> np.ndarray:
        """BM25 score of every document for one query's token ids, float64 [C]."""
        q = np.unique(_as_ids(query, "query"))
        q = q[(q >= 0) & (q < self.vocab_size)]  # tokens never seen in the corpus match nothing
        q = q[self.doc_freq[q] > 0]
        if q.size == 0:
            return np.zeros(self.n_docs)
        starts, stops = self.indptr[q], self.indptr[q + 1]
        # loop over the query's distinct tokens (tens), never over documents
        rows = np.concatenate([self.postings[s:e] for s, e in zip(starts.tolist(), stops.tolist(), strict=True)])
        weights = np.repeat(self.idf[q], stops - starts)
        return np.bincount(rows, weights=weights, minlength=self.n_docs) * self.length_factor

    def candidates(self, queries: Sequence[Any], n: int) -> list[np.ndarray]:
        """Per query, the indices of its top-n documents, best first (ties: lower index first).

        When fewer than n documents share a token with the query, the rest are filled with
        zero-score documents in index order, so every query gets exactly min(n, C) candidates.
        """
        n = check_int(n, "n")
        if isinstance(queries, (str, bytes)) or not hasattr(queries, "__len__"):
            raise TypeError(f"queries must be a list of token-id sequences, got {type(queries).__name__}")
        return [top_n(self.scores(q), n) for q in queries]


def token_ids(data: Any, task: Task, batch_size: int = 256) -> list[np.ndarray]:
    """Each example's token ids as the model sees them: ``task.collate`` then the unpadded ids.

    Going through the task (not a tokenizer) guarantees that BM25 sees exactly the tokens that
    are scored, whatever form the examples take (text, prompt + completion, input_ids).
    Examples are collated ``batch_size`` at a time; padding is dropped with the attention mask.
    """
    data = check_data(data, "data")
    batch_size = check_int(batch_size, "batch_size")
    out: list[np.ndarray] = []
    for lo in range(0, len(data), batch_size):
        items = [data[i] for i in range(lo, min(len(data), lo + batch_size))]
        batch = task.collate(items)
        if not isinstance(batch, dict) or "input_ids" not in batch:
            found = list(batch.keys()) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                f"token_ids needs a task whose collate returns a dict with 'input_ids' (a language-modelling "
                f"task); {type(task).__name__}.collate returned {found}"
            )
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        flat = ids[mask].cpu().numpy().astype(np.int64)
        out.extend(np.split(flat, np.cumsum(mask.sum(1).cpu().numpy())[:-1]))
    return out


def scores_with_candidates(
    attributor: Any,
    queries: Any,
    train: Any,
    candidates: int,
    index: BM25Index | None = None,
    **score_kwargs: Any,
) -> Scores:
    """``attributor.scores`` restricted to each query's top-``candidates`` BM25 matches.

    Only the union of the candidate sets is scored (one pass over that subset of ``train``), then
    scattered back into a full [Q, N] result. A query's non-candidates get 0, also in
    ``per_layer`` and ``per_token``; ``Scores.mask`` is a bool [Q, N] tensor marking which entries
    were scored (``top``/``bottom`` rank only those) and ``meta["candidates"]`` the requested N. Pass a prebuilt
    ``index`` (over ``train``, in order) to reuse it across calls.
    """
    n = check_int(candidates, "candidates")
    train = check_data(train, "training data")
    queries = check_data(queries, "queries")
    if index is None:
        index = BM25Index(token_ids(train, attributor.task))
    elif not isinstance(index, BM25Index):
        raise TypeError(f"index must be a headwater.filtering.BM25Index, got {type(index).__name__}")
    if len(index) != len(train):
        raise ValueError(
            f"index covers {len(index)} documents but train has {len(train)} examples; "
            "build the index from token_ids(train, task) of this same training set"
        )
    chosen = index.candidates(token_ids(queries, attributor.task), n)
    union = np.unique(np.concatenate(chosen))
    subset = Subset(train, union.tolist())
    sub = attributor.scores(queries, subset, **score_kwargs)

    n_q, n_train = len(queries), len(train)
    mask = torch.zeros(n_q, n_train, dtype=torch.bool)
    rows = torch.from_numpy(np.repeat(np.arange(n_q), [c.shape[0] for c in chosen]))
    mask[rows, torch.from_numpy(np.concatenate(chosen))] = True
    cols = torch.from_numpy(union)
    sub_mask = mask[:, cols]  # [Q, U]: which of the scored columns belong to each query

    def scatter(x: torch.Tensor) -> torch.Tensor:  # [Q, U, *] -> [Q, N, *], zero outside the query's candidates
        full = x.new_zeros((n_q, n_train, *x.shape[2:]))
        keep = sub_mask.reshape(*sub_mask.shape, *([1] * (x.dim() - 2)))
        full[:, cols] = torch.where(keep, x, torch.zeros((), dtype=x.dtype))
        return full

    per_layer = {k: scatter(v) for k, v in sub.per_layer.items()} if sub.per_layer is not None else None
    per_token = scatter(sub.per_token) if sub.per_token is not None else None
    return Scores(scatter(sub.values), per_layer, per_token, {**sub.meta, "candidates": n}, mask=mask)
