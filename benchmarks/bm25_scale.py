"""How the BM25 candidate filter scales: a million short documents on one CPU.

    python benchmarks/bm25_scale.py                      # 1,000,000 docs, 20-60 tokens, vocab 50k
    python benchmarks/bm25_scale.py --docs 100000 --queries 20

Token ids are drawn from a Zipf-like law over the vocabulary (p(rank r) ~ 1/r), so frequent
tokens have posting lists of hundreds of thousands of documents, as real tokenized text does;
uniform ids would make every query look cheaper than it is. Queries (prompt + completion,
20-40 tokens) are drawn the same way.

Prints: index build time from the flat (tokens, offsets) form and from a list of per-document
arrays, per-query time of ``scores`` and of ``candidates(n=10_000)``, the index's own size,
and peak memory: the traced numpy peak during the build (``tracemalloc`` sees numpy's
allocations) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc

import numpy as np

from headwater.filtering import BM25Index


def zipf_tokens(rng: np.random.Generator, n: int, ids_by_rank: np.ndarray) -> np.ndarray:
    """n token ids with p(rank r) ~ 1/r; ``ids_by_rank`` maps ranks to ids (frequency is not id order)."""
    p = 1.0 / np.arange(1, ids_by_rank.shape[0] + 1)
    cdf = np.cumsum(p / p.sum())
    ranks = np.searchsorted(cdf, rng.random(n), side="right").clip(max=ids_by_rank.shape[0] - 1)
    return ids_by_rank[ranks].astype(np.int32)


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=60)
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--n", type=int, default=10_000, help="candidates per query")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_len, args.max_len + 1, args.docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids_by_rank = rng.permutation(args.vocab)
    tokens = zipf_tokens(rng, int(offsets[-1]), ids_by_rank)
    queries = [zipf_tokens(rng, int(k), ids_by_rank) for k in rng.integers(20, 41, args.queries)]
    print(
        f"corpus: {args.docs:,} docs, {tokens.size:,} tokens ({tokens.nbytes / 2**20:.0f} MiB as int32), "
        f"lengths {args.min_len}-{args.max_len}, vocab {args.vocab:,}"
    )
    print(f"peak RSS after generating the corpus: {peak_rss_mb():.0f} MiB")

    tracemalloc.start()
    t0 = time.perf_counter()
    index = BM25Index.from_flat(tokens, offsets)
    build_flat = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"build (flat tokens + offsets): {build_flat:.2f} s, traced peak {traced_peak / 2**20:.0f} MiB, "
        f"index holds {index.nbytes / 2**20:.0f} MiB"
    )
    print(f"peak RSS after the flat build: {peak_rss_mb():.0f} MiB")

    t0 = time.perf_counter()
    per_query = [index.scores(q) for q in queries]
    t_scores = (time.perf_counter() - t0) / len(queries)
    t0 = time.perf_counter()
    top = index.candidates(queries, args.n)
    t_cand = (time.perf_counter() - t0) / len(queries)
    matched = np.mean([(s > 0).sum() for s in per_query])
    print(
        f"query: scores {t_scores * 1e3:.1f} ms/query, candidates(n={args.n:,}) {t_cand * 1e3:.1f} ms/query "
        f"({len(queries)} queries of 20-40 tokens; on average {matched:,.0f} docs share a token with a query)"
    )
    assert all(t.shape[0] == min(args.n, args.docs) for t in top)

    docs = np.split(tokens, offsets[1:-1])  # a list of per-document arrays, as token_ids() returns
    t0 = time.perf_counter()
    index2 = BM25Index(docs)
    build_list = time.perf_counter() - t0
    same = np.array_equal(index2.postings, index.postings) and np.allclose(index2.idf, index.idf)
    print(f"build (list of {len(docs):,} arrays): {build_list:.2f} s (same index: {same})")
    print(f"peak RSS at the end (corpus as flat array and as a list, two indexes): {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
