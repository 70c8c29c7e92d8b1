"""Ways to read a score matrix, after Grosse et al. (2023): sparsity, layers, tokens, overlap.

A [Q, N] influence matrix answers "which sequences?"; the paper also asks how the influence is
*distributed*. Four analyses, each returning plain JSON-serializable dicts of numbers:

- ``sparsity``: a power law fitted to the tail of each query's positive influences (exponent,
  xmin, KS statistic, optional bootstrap p-value, tail points to plot), and the share of the
  total positive influence held by the top 1% of sequences.
- ``layer_profile``: tracked layers, in model order, split into depth blocks (9, as in the
  paper); the fraction of each query's influence carried by each block.
- ``token_structure``: per-token influence of the top sequences; sequences whose token
  influences a satisfy ||a||_2 / ||a||_1 > 2/3 are flagged as concentrated on a few tokens
  (the paper's heuristic for spurious matches). ``output_token_influence`` is the appendix-B
  counterfactual per output token.
- ``cross_query``: Jaccard overlap of the queries' top-k sets, and the sequences that appear in
  many of them (sequences that "influence everything").

``analyze(scores)`` runs all that apply; ``analyze_workdir(DIR)`` does so for a saved run
(``DIR/scores.safetensors``), which is what ``headwater analyze DIR`` runs::

    headwater analyze runs/demo            # prints a summary, writes runs/demo/analysis.json
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import check_data
from .scoring import Scores
from .storage import load_tensors
from .validation import check_int

__all__ = [
    "PowerLawFit",
    "fit_power_law",
    "top_share",
    "sparsity",
    "layer_order",
    "layer_blocks",
    "layer_profile",
    "concentration",
    "token_structure",
    "output_token_influence",
    "cross_query",
    "analyze",
    "analyze_workdir",
    "summary",
]

SPURIOUS_RATIO = 2 / 3  # the paper's ||a||_2 / ||a||_1 threshold for token-concentrated sequences
N_BLOCKS = 9  # the paper splits the layers into 9 depth blocks


def _num(x: Any) -> float | None:
    """A JSON-safe float: NaN and inf (undefined quantities) become None."""
    x = float(x)
    return x if math.isfinite(x) else None


def _rows(values: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None) -> list[np.ndarray]:
    """Each query's scored values (all columns, or only its candidates when a mask is given)."""
    v = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if v.ndim != 2:
        raise ValueError(f"values must be a [Q, N] matrix, got shape {v.shape}")
    if mask is None:
        return list(v)
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.shape != v.shape:
        raise ValueError(f"candidate mask has shape {m.shape} but values have shape {v.shape}; they must match")
    return [row[keep] for row, keep in zip(v, m.astype(bool), strict=True)]


# ---------------------------------------------------------------------------- sparsity
@dataclass
class PowerLawFit:
    """p(x) = (alpha - 1) / xmin * (x / xmin)^-alpha for x >= xmin (continuous, Clauset et al. 2009).

    alpha_stderr = (alpha - 1) / sqrt(n_tail); ks is the Kolmogorov-Smirnov distance between the
    tail's empirical CDF and the fit; p_value (bootstrap, None unless asked for) is the share of
    synthetic power-law data sets that fit worse: above 0.1 a power law is plausible.
    tail: up to 40 points (x, P(X >= x)) of the empirical CCDF over all positive values, to plot;
    the fit's CCDF is (n_tail / n_positive) * (x / xmin)^(1 - alpha) for x >= xmin.
    """

    alpha: float
    alpha_stderr: float
    xmin: float
    n_tail: int
    n_positive: int
    ks: float
    p_value: float | None
    tail: list[list[float]]


def _ks_curve(
    xs: np.ndarray, starts: np.ndarray, logs: np.ndarray, suffix: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """MLE alpha and KS distance for each candidate xmin = xs[j], j in ``starts`` (xs sorted ascending)."""
    n = xs.shape[0]
    m = n - starts
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1.0 + m / (suffix[starts] - m * logs[starts])  # MLE: 1 + m / sum log(x / xmin)
    ks = np.full(starts.shape[0], np.inf)
    for k, j in enumerate(starts.tolist()):  # a few hundred candidates, each vectorized over its tail
        if not np.isfinite(alpha[k]) or alpha[k] <= 1:
            continue
        tail = xs[j:]
        cdf = 1.0 - (tail / tail[0]) ** (1.0 - alpha[k])
        mk = tail.shape[0]
        ks[k] = max((np.arange(1, mk + 1) / mk - cdf).max(), (cdf - np.arange(mk) / mk).max())
    return alpha, ks


def _fit(xs: np.ndarray, min_tail: int, max_candidates: int, xmin: float | None) -> tuple[float, float, int]:
    """(alpha, ks, index of xmin) for sorted positive xs, choosing xmin by minimum KS distance."""
    logs = np.log(xs)
    suffix = np.cumsum(logs[::-1])[::-1]  # suffix[j] = sum_{i >= j} log xs[i]
    n = xs.shape[0]
    if xmin is not None:
        starts = np.array([int(np.searchsorted(xs, xmin, side="left"))])
        if n - starts[0] < min_tail:
            raise ValueError(f"only {n - starts[0]} values are >= xmin={xmin}; need at least min_tail={min_tail}")
    else:
        # each distinct value is a candidate xmin (its first occurrence), leaving >= min_tail in the tail
        first = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
        starts = first[first <= n - min_tail]
        if starts.shape[0] > max_candidates:  # an even grid over ranks keeps the search O(n * max_candidates)
            starts = np.unique(starts[np.linspace(0, starts.shape[0] - 1, max_candidates).round().astype(int)])
    alpha, ks = _ks_curve(xs, starts, logs, suffix)
    if not np.isfinite(ks).any():
        raise ValueError("no candidate xmin gives a valid power-law fit (all tail values are equal?)")
    best = int(np.argmin(ks))  # first minimum: the smallest such xmin, i.e. the largest tail
    return float(alpha[best]), float(ks[best]), int(starts[best])


def fit_power_law(
    x: Any,
    xmin: float | None = None,
    min_tail: int = 10,
    max_candidates: int = 200,
    bootstrap: int = 0,
    seed: int = 0,
) -> PowerLawFit:
    """Fit a continuous power law to the positive values of ``x`` by maximum likelihood.

    xmin is chosen to minimise the KS distance (Clauset, Shalizi & Newman 2009) unless given.
    ``bootstrap`` > 0 adds their semi-parametric goodness-of-fit p-value from that many synthetic
    data sets (each refitted with its own xmin search), which costs ``bootstrap`` fits.
    """
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).ravel()
    check_int(min_tail, "min_tail", low=2)
    check_int(bootstrap, "bootstrap", low=0)
    xs = np.sort(arr[np.isfinite(arr) & (arr > 0)])
    if xs.shape[0] < min_tail:
        raise ValueError(
            f"a power-law fit needs at least min_tail={min_tail} positive values, got {xs.shape[0]}; "
            "score more training sequences or lower min_tail"
        )
    alpha, ks, j = _fit(xs, min_tail, max_candidates, xmin)
    n, m = xs.shape[0], xs.shape[0] - j
    p_value = None
    if bootstrap:
        rng = np.random.default_rng(seed)
        body = xs[:j]
        worse = 0
        for _ in range(bootstrap):
            k = rng.binomial(n, m / n) if j > 0 else n  # how many synthetic points come from the power law
            synth = xs[j] * (1.0 - rng.random(k)) ** (-1.0 / (alpha - 1.0))
            synth = np.sort(np.concatenate([synth, rng.choice(body, n - k)]) if n - k else synth)
            try:
                worse += _fit(synth, min(min_tail, synth.shape[0]), max_candidates, None)[1] >= ks
            except ValueError:
                continue
        p_value = worse / bootstrap
    grid = np.unique(np.geomspace(xs[0], xs[-1], 40)) if xs[-1] > xs[0] else xs[:1]
    ccdf = 1.0 - np.searchsorted(xs, grid, side="left") / n  # P(X >= x)
    return PowerLawFit(
        alpha=alpha,
        alpha_stderr=(alpha - 1.0) / math.sqrt(m),
        xmin=float(xs[j]),
        n_tail=int(m),
        n_positive=int(n),
        ks=ks,
        p_value=p_value,
        tail=[[float(a), float(b)] for a, b in zip(grid, ccdf, strict=True)],
    )


def top_share(row: Any, fraction: float = 0.01) -> float | None:
    """Share of the total positive influence held by the top ``fraction`` of sequences.

    The top ceil(fraction * N) sequences of the row (N = all scored sequences, negative ones
    included, as the paper counts them), their positive influence over all positive influence.
    None when no influence is positive.
    """
    v = np.asarray(row, dtype=np.float64).ravel()
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    pos = np.clip(v, 0, None)
    total = pos.sum()
    if v.shape[0] == 0 or total <= 0:
        return None
    k = max(1, math.ceil(fraction * v.shape[0]))
    return float(np.sort(pos)[::-1][:k].sum() / total)


def sparsity(
    values: torch.Tensor | np.ndarray,
    candidate_mask: torch.Tensor | None = None,
    min_tail: int = 10,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """Per query: power-law fit of the positive influences and the top-1% share; and their means.

    Returns ``{"per_query": [{"top1pct_share", "n_scored", "n_positive", "power_law": {...} | None}],
    "mean_top1pct_share", "median_alpha"}``. ``power_law`` is None when a query has fewer than
    ``min_tail`` positive influences.
    """
    out = []
    for row in _rows(values, candidate_mask):
        try:
            fit = asdict(fit_power_law(row, min_tail=min_tail, bootstrap=bootstrap, seed=seed))
        except ValueError:
            fit = None
        out.append(
            {
                "top1pct_share": top_share(row),
                "n_scored": int(row.shape[0]),
                "n_positive": int((row > 0).sum()),
                "power_law": fit,
            }
        )
    shares = [r["top1pct_share"] for r in out if r["top1pct_share"] is not None]
    alphas = [r["power_law"]["alpha"] for r in out if r["power_law"] is not None]
    return {
        "per_query": out,
        "mean_top1pct_share": _num(np.mean(shares)) if shares else None,
        "median_alpha": _num(np.median(alphas)) if alphas else None,
    }


# ---------------------------------------------------------------------------- layers
def layer_order(names: list[str]) -> list[str]:
    """Layer names in model order when only names are known (e.g. after loading from disk).

    Natural sort: digit runs compare as numbers, so ``h.2`` comes before ``h.10`` (safetensors
    and sorted JSON keys lose the model's own order).
    """
    key = lambda s: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s)]
    return sorted(names, key=key)


def layer_blocks(names: list[str], n_blocks: int = N_BLOCKS) -> list[list[str]]:
    """Split layers (in the order given) into ``n_blocks`` contiguous depth blocks of near-equal size.

    The first ``len(names) % n_blocks`` blocks get one layer more; with fewer layers than blocks,
    each layer is its own block.
    """
    check_int(n_blocks, "n_blocks")
    if not names:
        raise ValueError("no layers to split; score with per_layer=True to get a layer profile")
    return [list(b) for b in np.array_split(np.array(names, dtype=object), min(n_blocks, len(names)))]


def layer_profile(
    per_layer: dict[str, torch.Tensor],
    values: torch.Tensor | None = None,
    n_blocks: int = N_BLOCKS,
    top_k: int | None = 100,
    candidate_mask: torch.Tensor | None = None,
) -> dict:
    """Fraction of each query's influence carried by each depth block of layers.

    ``per_layer`` maps layer name -> [Q, N], in model order (``Scores.per_layer`` keeps it; use
    ``layer_order`` for names loaded from disk). For query q the sequences S_q are its ``top_k``
    most positive by total influence (``values``, or the sum over layers), all scored ones if
    None. Then

        fraction[q, b] = sum_{m in S_q} sum_{l in block b} |I_l(q, m)|  /  sum over all blocks

    Absolute values, per layer and sequence, because per-layer terms of one sequence can have
    opposite signs: signed sums could make a block's fraction negative or above 1, and would hide
    a block that pushes strongly both ways. Fractions are in [0, 1] and sum to 1 (None for a
    query whose per-layer influences are all zero). ``mean`` averages over queries.
    """
    if not per_layer:
        raise ValueError("per_layer is empty; score with per_layer=True to get a layer profile")
    names = list(per_layer)
    blocks = layer_blocks(names, n_blocks)
    stack = torch.stack([per_layer[n].detach().cpu().double() for n in names])  # [L, Q, N]
    total = stack.sum(0) if values is None else values.detach().cpu().double()
    if total.shape != stack.shape[1:]:
        raise ValueError(f"values has shape {tuple(total.shape)} but per_layer entries have {tuple(stack.shape[1:])}")
    if candidate_mask is not None:
        total = total.masked_fill(~candidate_mask.cpu().bool(), -math.inf)  # never among the top k
    n_q, n = total.shape
    k = n if top_k is None else min(int(top_k), n)
    top = torch.topk(total, k, dim=1).indices  # [Q, k]
    if candidate_mask is not None:
        valid = torch.gather(candidate_mask.cpu().bool(), 1, top).double()  # drop non-candidates when k > |candidates|
    else:
        valid = torch.ones(n_q, k, dtype=torch.float64)
    absval = torch.gather(stack.abs(), 2, top.expand(len(names), n_q, k)) * valid  # [L, Q, k]
    per_layer_mass = absval.sum(2)  # [L, Q]
    offsets = np.cumsum([0] + [len(b) for b in blocks])
    mass = torch.stack([per_layer_mass[lo:hi].sum(0) for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)])
    denom = mass.sum(0)  # [Q]
    per_query = [
        [_num(mass[b, q] / denom[q]) for b in range(len(blocks))] if denom[q] > 0 else None for q in range(n_q)
    ]
    defined = [p for p in per_query if p is not None]
    return {
        "blocks": blocks,
        "top_k": k,
        "per_query": per_query,
        "mean": [_num(np.mean([p[b] for p in defined])) for b in range(len(blocks))] if defined else None,
        "definition": "sum of |per-layer influence| over the query's top_k sequences, per block, over all blocks",
    }


# ---------------------------------------------------------------------------- tokens
def concentration(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """||a||_2 / ||a||_1 over the last axis (0 for an all-zero vector).

    1 when one token carries everything, 1/sqrt(T) when T tokens carry equal shares.
    """
    a = np.asarray(a.detach().cpu().double() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    l1 = np.abs(a).sum(-1)
    l2 = np.sqrt((a * a).sum(-1))
    return np.divide(l2, l1, out=np.zeros_like(l1), where=l1 > 0)


def _token_row(index: int, score: float, a: np.ndarray, threshold: float) -> dict:
    """One examined sequence: its concentration ratio, flag and dominant token (a: token influences)."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    ratio = float(concentration(a)) if a.size else 0.0
    l1 = float(a.sum())
    return {
        "index": int(index),
        "score": float(score),
        "ratio": ratio,
        "flagged": ratio > threshold,
        "top_token": int(a.argmax()) if a.size else None,
        "top_token_share": float(a.max() / l1) if l1 > 0 else None,
    }


def _token_summary(per_query: list[list[dict]], threshold: float) -> dict:
    flagged = sum(r["flagged"] for rows in per_query for r in rows)
    examined = sum(len(rows) for rows in per_query)
    return {
        "per_query": per_query,
        "n_flagged": flagged,
        "n_examined": examined,
        "flagged_share": flagged / examined if examined else None,
        "threshold": threshold,
    }


def token_structure(
    per_token: torch.Tensor,
    values: torch.Tensor | None = None,
    top_k: int = 10,
    threshold: float = SPURIOUS_RATIO,
    candidate_mask: torch.Tensor | None = None,
) -> dict:
    """Per query, the token structure of its top-k sequences, flagging token-concentrated ones.

    per_token: [Q, N, T] (``Scores.per_token``). A sequence is flagged when its token influences
    have ||a||_2 / ||a||_1 > threshold (2/3 in the paper): its influence comes from one or two
    tokens, which usually means a lexical coincidence rather than a related sequence. Returns
    ``{"per_query": [[{"index", "score", "ratio", "flagged", "top_token", "top_token_share"}]],
    "n_flagged", "n_examined", "flagged_share", "threshold"}``; ``top_token`` is the position with
    the largest |influence| and ``top_token_share`` its |a_t| / ||a||_1.
    """
    pt = per_token.detach().cpu().double()
    if pt.dim() != 3:
        raise ValueError(f"per_token must be [Q, N, T], got shape {tuple(pt.shape)}")
    total = pt.sum(2) if values is None else values.detach().cpu().double()
    if candidate_mask is not None:
        total = total.masked_fill(~candidate_mask.cpu().bool(), -math.inf)
    k = min(int(top_k), total.shape[1])
    top_v, top_i = torch.topk(total, k, dim=1)
    out = [
        [
            _token_row(i, v, pt[q, i].numpy(), threshold)
            for v, i in zip(top_v[q].tolist(), top_i[q].tolist(), strict=True)
            if math.isfinite(v)  # fewer candidates than k
        ]
        for q in range(pt.shape[0])
    ]
    return _token_summary(out, threshold)


def output_token_influence(
    attributor: Any, queries: Any, train: Any, batch_size: int = 8, **score_kwargs: Any
) -> list[np.ndarray]:
    """The paper's output-token counterfactual (appendix B): influence of each token's own loss term.

    For training sequence m and position t, keep only the loss on predicting token t (labels
    -100 elsewhere) and score that one-term sequence: the change in influence if token t were
    dropped from the training targets. By linearity of the gradient these sum over t to the
    sequence's full influence. Unlike ``Scores.per_token`` (indexed by the *input* position s,
    whose gradient also carries later tokens' losses through attention), this is indexed by the
    *output* token. It costs one backward pass per scored token, so run it on a few top sequences.

    Returns, per training sequence, a [Q, T_m] array; entry t is the influence of predicting
    token t (0 where t is not scored, e.g. t = 0 or a prompt token).
    """
    train = check_data(train, "training data")
    batch_size = check_int(batch_size, "batch_size")
    variants, owner, position, lengths = [], [], [], []
    for m in range(len(train)):
        batch = attributor.task.collate([train[m]])
        if not isinstance(batch, dict) or "labels" not in batch:
            raise ValueError(
                "output_token_influence needs a language-modelling task whose collate returns 'input_ids' and "
                f"'labels'; {type(attributor.task).__name__} returned {type(batch).__name__}"
            )
        keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))[0].bool()
        ids, labels = batch["input_ids"][0][keep], batch["labels"][0][keep]
        lengths.append(ids.shape[0])
        for t in torch.nonzero(labels[1:] != -100).flatten().add(1).tolist():  # token 0 is never predicted
            lab = torch.full_like(labels, -100)
            lab[t] = labels[t]
            variants.append({"input_ids": ids, "labels": lab})
            owner.append(m)
            position.append(t)
    if not variants:
        raise ValueError("no training token is scored (every label is -100); nothing to attribute")
    sc = attributor.scores(queries, variants, batch_size=batch_size, **score_kwargs).values.double().numpy()
    out = [np.zeros((sc.shape[0], n)) for n in lengths]
    for col, (m, t) in enumerate(zip(owner, position, strict=True)):
        out[m][:, t] = sc[:, col]
    return out


# ---------------------------------------------------------------------------- across queries
def cross_query(values: torch.Tensor | np.ndarray, k: int = 10, candidate_mask: torch.Tensor | None = None) -> dict:
    """Overlap of the queries' top-k sets, and the sequences found in several of them.

    Top-k is by score, ties to the lower index (deterministic). ``jaccard[p][q]`` is
    |T_p & T_q| / |T_p | T_q|; ``mean_jaccard`` averages the off-diagonal pairs (None for one
    query). ``shared`` lists sequences in at least two queries' top-k, most queries first:
    ``{"index", "queries", "share"}`` with share = queries / Q.
    """
    from .filtering import top_n

    v = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if candidate_mask is not None:
        v = np.where(candidate_mask.cpu().numpy().astype(bool), v, -np.inf)
    check_int(k, "k")
    sets = [set(top_n(row, k)[np.isfinite(row[top_n(row, k)])].tolist()) for row in v]
    n_q = len(sets)
    jac = [[len(a & b) / len(a | b) if a | b else 1.0 for b in sets] for a in sets]
    off = [jac[p][q] for p in range(n_q) for q in range(n_q) if p != q]
    counts: dict[int, int] = {}
    for s in sets:
        for i in s:
            counts[i] = counts.get(i, 0) + 1
    shared = sorted(((i, c) for i, c in counts.items() if c >= 2), key=lambda t: (-t[1], t[0]))
    return {
        "k": k,
        "top": [sorted(s) for s in sets],
        "jaccard": jac,
        "mean_jaccard": _num(np.mean(off)) if off else None,
        "shared": [{"index": i, "queries": c, "share": c / n_q} for i, c in shared],
    }


# ---------------------------------------------------------------------------- all together
def analyze(
    scores: Scores,
    candidate_mask: torch.Tensor | None = None,
    top_k: int = 10,
    n_blocks: int = N_BLOCKS,
    layer_top_k: int | None = 100,
    bootstrap: int = 0,
) -> dict:
    """Every analysis that the scores support, as one JSON-serializable dict.

    Keys: ``n_queries``, ``n_train``, ``sparsity``, ``cross_query``, and ``layers`` (needs
    ``per_layer``) and ``tokens`` (needs ``per_token``), None when absent. The candidate mask
    defaults to ``scores.mask`` (set by candidate filtering): only scored entries count.
    """
    if not isinstance(scores, Scores):
        raise TypeError(f"scores must be a headwater Scores, got {type(scores).__name__}")
    if candidate_mask is None:
        candidate_mask = scores.mask
    v, mask = scores.values, candidate_mask
    layers = layer_profile(scores.per_layer, v, n_blocks, layer_top_k, mask) if scores.per_layer else None
    tokens = token_structure(scores.per_token, v, top_k, candidate_mask=mask) if scores.per_token is not None else None
    return {
        "n_queries": int(v.shape[0]),
        "n_train": int(v.shape[1]),
        "sparsity": sparsity(v, mask, bootstrap=bootstrap),
        "layers": layers,
        "tokens": tokens,
        "cross_query": cross_query(v, top_k, mask),
    }


def analyze_workdir(directory: str | Path, **kwargs: Any) -> dict:
    """``analyze`` for a saved run: ``DIR/scores.safetensors`` (``Scores.tensors()``, plus an
    the optional bool ``mask`` [Q, N] of candidate filtering). Layers are put in model order: the header's
    ``layers`` list when it names them all (``headwater score`` writes it), else natural sort.
    ``DIR/results.jsonl``, when it has one JSON row per query, gives ``query_labels`` and, if the
    tensors hold no per-token scores, the token structure of the top sequences it lists.
    """
    directory = Path(directory)
    path = directory / "scores.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; run `headwater score ... --out {directory}` first (or pass the run's directory)"
        )
    tensors, meta = load_tensors(path)
    scores = Scores.from_tensors(tensors, meta)
    if scores.per_layer:
        saved = meta.get("layers")  # `headwater score` records the tracked layers in model order
        names = saved if isinstance(saved, list) and sorted(saved) == sorted(scores.per_layer) else None
        scores.per_layer = {n: scores.per_layer[n] for n in names or layer_order(list(scores.per_layer))}
    out = analyze(scores, **kwargs)
    out["directory"] = str(directory)
    rows = _result_rows(directory / "results.jsonl", scores.values.shape[0])
    pick = lambda r: next((r[k] for k in ("query", "prompt", "text") if isinstance(r.get(k), str)), None)
    out["query_labels"] = [pick(r) for r in rows] if rows else None
    if out["tokens"] is None and rows:
        out["tokens"] = _token_structure_from_rows(rows, kwargs.get("top_k", 10))
    return out


def _result_rows(path: Path, n_queries: int) -> list[dict] | None:
    """results.jsonl's rows when it has one JSON object per query; any other layout is ignored, not guessed at."""
    if not path.exists():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if len(rows) != n_queries or not all(isinstance(r, dict) for r in rows):
        return None
    return rows


def _token_structure_from_rows(rows: list[dict], top_k: int, threshold: float = SPURIOUS_RATIO) -> dict | None:
    """``token_structure`` from the per-token scores that ``headwater score`` keeps for its top sequences.

    Used when scores.safetensors has no [Q, N, T] per-token tensor (scored without --per-token).
    Rows are ``{"top": [{"index", "score", "token_scores"}, ...]}``; positions are those of the
    shown tokens.
    """
    out = []
    for row in rows:
        top = row.get("top")
        if not isinstance(top, list) or not all(isinstance(e, dict) and "token_scores" in e for e in top):
            return None
        out.append([_token_row(e["index"], e["score"], e["token_scores"], threshold) for e in top[:top_k]])
    return _token_summary(out, threshold)


def summary(res: dict) -> str:
    """A terminal summary of ``analyze``'s result."""
    lines = [f"{res['n_queries']} queries x {res['n_train']} training sequences"]
    sp = res["sparsity"]
    if sp["mean_top1pct_share"] is not None:
        lines.append(f"sparsity: top 1% of sequences hold {sp['mean_top1pct_share']:.1%} of positive influence (mean)")
    labels = res.get("query_labels") or []
    for q, r in enumerate(sp["per_query"]):
        pl = r["power_law"]
        if pl is not None:
            p = "" if pl["p_value"] is None else f", p={pl['p_value']:.2f}"
            name = f"query {q}" + (f" ({labels[q][:40]!r})" if q < len(labels) and labels[q] else "")
            lines.append(
                f"  {name}: alpha={pl['alpha']:.2f}+-{pl['alpha_stderr']:.2f} above xmin={pl['xmin']:.3g} "
                f"({pl['n_tail']} of {pl['n_positive']} positive), KS={pl['ks']:.3f}{p}"
            )
    if res["layers"] is not None and res["layers"]["mean"] is not None:
        fr = " ".join(f"{x:.2f}" for x in res["layers"]["mean"])
        lines.append(f"layers: influence fraction per depth block, shallow -> deep: {fr}")
    if res["tokens"] is not None:
        t = res["tokens"]
        lines.append(
            f"tokens: {t['n_flagged']} of {t['n_examined']} top sequences concentrated on few tokens "
            f"(||a||2/||a||1 > {t['threshold']:.2f})"
        )
    cq = res["cross_query"]
    if cq["mean_jaccard"] is not None:
        lines.append(
            f"cross-query: mean top-{cq['k']} Jaccard overlap {cq['mean_jaccard']:.3f}; "
            f"{len(cq['shared'])} sequences in 2+ queries' top-{cq['k']}"
        )
        for s in cq["shared"][:5]:
            lines.append(f"  sequence {s['index']}: in {s['queries']} queries' top-{cq['k']}")
    return "\n".join(lines)
