"""LDS, the linear datamodeling score (Park et al., 2023): do scores predict retraining?

Recipe:

1. ``sample_subsets``: M random subsets of the N training examples, each of size
   ``round(alpha * N)``, from a seed.
2. ``retrain_measurements``: retrain on every subset under each of R seeds with a
   user-supplied ``retrain(subset_indices, seed) -> measurements [Q]`` and average over seeds.
   Every (subset, seed) result is written atomically to ``cache_dir`` (safetensors + JSON,
   never pickle), so an interrupted run resumes with the pairs it has not done yet.
3. ``lds``: per query, the Spearman rank correlation over the M subsets between the actual
   measurement and the prediction, then the mean and a 95% interval over queries.

The prediction. An engine score is ``score(q, m) = grad f_q^T H^-1 grad L_m`` with H the damped
Gauss-Newton stand-in for the Hessian of the training objective ``J = (1/N) sum_i L_i``.
Upweighting m, ``J + eps L_m``, moves the optimum by ``dtheta/deps = -H^-1 grad L_m``, so
``df_q/deps = -score(q, m)``: removing m (eps = -1/N) raises f_q by score/N. Training on a
subset S of size k puts weight 1/k on its members and 0 elsewhere instead of 1/N everywhere,
so to first order

    f_q(S) - f_q(all) = -(1/k) sum_{m in S} score(q, m) + (1/N) sum_{all m} score(q, m),

and the second term is the same for every subset. We therefore correlate the measurement
with ``-sum_{m in S} score(q, m)``: a good method has LDS near +1, whichever tool produced the
scores, as long as positive means "upweighting lowers the query's measurement".

The interval is a Student-t 95% interval of the mean over queries,
``mean +- t_{0.975, Q-1} * sd / sqrt(Q)``: deterministic and, with Q >= 20 roughly normal
per-query correlations, close to a bootstrap. Queries whose measurement does not vary over
the subsets have no rank correlation; they are left out and counted in ``undefined``.

Example::

    subsets = sample_subsets(len(train), num_subsets=100, alpha=0.5, seed=0)
    y = retrain_measurements(retrain, subsets, seeds=3, cache_dir="runs/lds")
    res = lds(scores.values, subsets, y)
    print(res.mean, res.low, res.high)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from ..storage import SCHEMA_VERSION, load_json, load_tensors, save_json, save_tensors

__all__ = ["sample_subsets", "retrain_measurements", "lds", "LDSResult", "Correlation", "correlation_summary"]

Retrain = Callable[[torch.Tensor, int], Any]


@dataclass
class Correlation:
    """Per-query correlations and their summary: mean and a 95% t-interval over queries."""

    mean: float
    low: float
    high: float
    per_query: torch.Tensor  # [Q], NaN where undefined
    undefined: int = 0
    interval: str = "student-t 95% over queries"

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class LDSResult(Correlation):
    """LDS per query, with the predictions and measurements it was computed from."""

    predicted: torch.Tensor = field(default=None)  # [M, Q], -sum of scores over each subset
    measured: torch.Tensor = field(default=None)  # [M, Q], mean over retraining seeds


def correlation_summary(per_query: torch.Tensor) -> Correlation:
    """Mean and 95% t-interval of per-query correlations, ignoring NaNs (undefined queries)."""
    vals = per_query[torch.isfinite(per_query)].double()
    undefined = int(per_query.numel() - vals.numel())
    if vals.numel() == 0:
        nan = float("nan")
        return Correlation(nan, nan, nan, per_query, undefined)
    mean = float(vals.mean())
    if vals.numel() < 2:
        return Correlation(mean, float("nan"), float("nan"), per_query, undefined)
    half = float(stats.t.ppf(0.975, vals.numel() - 1)) * float(vals.std()) / math.sqrt(vals.numel())
    return Correlation(mean, mean - half, mean + half, per_query, undefined)


def sample_subsets(n: int, num_subsets: int = 100, alpha: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``num_subsets`` random subsets of ``range(n)``, each of size round(alpha * n): [M, k], sorted rows."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer of at least 2 (the number of training examples), got {n!r}")
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or num_subsets < 3:
        raise ValueError(
            f"num_subsets must be an integer of at least 3 (a rank correlation needs them), got {num_subsets!r}"
        )
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a fraction strictly between 0 and 1, got {alpha!r}")
    k = round(alpha * n)
    if not 0 < k < n:
        raise ValueError(f"alpha={alpha} of n={n} examples gives subsets of {k}; choose alpha so that 0 < alpha*n < n")
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(num_subsets)])


def _subset_key(subset: torch.Tensor) -> str:
    return hashlib.sha256(np.asarray(subset, dtype=np.int64).tobytes()).hexdigest()[:16]


def _check_measurement(value: Any, where: str, q: int | None) -> torch.Tensor:
    try:
        raw = value.detach().cpu() if isinstance(value, torch.Tensor) else value
        t = torch.as_tensor(np.asarray(raw, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"retrain returned {type(value).__name__} for {where}; it must return a [Q] tensor or array of floats"
        ) from e
    if t.ndim != 1:
        raise ValueError(
            f"retrain returned shape {tuple(t.shape)} for {where}; it must return one measurement per query, [Q]"
        )
    if q is not None and t.numel() != q:
        raise ValueError(
            f"retrain returned {t.numel()} measurements for {where}, but earlier runs returned {q}; "
            "the queries must not change"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"retrain returned non-finite measurements for {where}; check the retraining (divergence?)")
    return t


def retrain_measurements(
    retrain: Retrain,
    subsets: torch.Tensor,
    seeds: int | Sequence[int] = 3,
    cache_dir: str | Path | None = None,
    tag: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Measurements after retraining on each subset under each seed: [M, R, Q].

    ``retrain(subset_indices [k] int64 tensor, seed) -> [Q]`` is called once per (subset, seed)
    that is not cached yet. ``seeds`` is a count (seeds 0..R-1) or an explicit list. ``tag``
    describes the retraining setup (task, model, queries); it is stored in the cache's
    ``config.json`` and a different tag is refused, so a cache is never read for another setup.
    ``progress(done, total)`` is called after each pair.
    """
    subsets = torch.as_tensor(subsets, dtype=torch.int64)
    if subsets.ndim != 2 or subsets.shape[0] < 3:
        raise ValueError(
            f"subsets must be a [M, k] integer tensor with M >= 3 (see sample_subsets), "
            f"got shape {tuple(subsets.shape)}"
        )
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be a positive count or a list of ints, got {seeds}")
        seeds = list(range(seeds))
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; give a count (e.g. 3) or a list of ints")
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        _open_cache(cache, tag or {})
    total = len(subsets) * len(seeds)
    out: list[list[torch.Tensor]] = []
    q: int | None = None
    done = 0
    for i, subset in enumerate(subsets):
        row = []
        key = _subset_key(subset)
        for s in seeds:
            where = f"subset {i} (seed {s})"
            path = cache / f"subset{i:04d}-seed{s}.safetensors" if cache is not None else None
            if path is not None and path.exists():
                tensors, meta = load_tensors(path)
                if meta.get("subset") != key or meta.get("seed") != s:
                    raise ValueError(
                        f"{path} holds another subset or seed than {where}; the subsets changed since this "
                        "cache was written: use a new cache_dir, or the same num_subsets/alpha/seed as before"
                    )
                y = _check_measurement(tensors["measurements"], where, q)
            else:
                y = _check_measurement(retrain(subset.clone(), s), where, q)
                if path is not None:
                    save_tensors(path, {"measurements": y}, {"subset": key, "seed": s, "size": int(subset.numel())})
            q = y.numel()
            row.append(y)
            done += 1
            if progress is not None:
                progress(done, total)
        out.append(torch.stack(row))
    return torch.stack(out)


def _open_cache(cache: Path, tag: dict) -> None:
    cfg = cache / "config.json"
    want = {"schema": SCHEMA_VERSION, "kind": "lds-retraining", "tag": tag}
    if cfg.exists():
        have = load_json(cfg)
        if have.get("tag") != want["tag"] or have.get("kind") != want["kind"]:
            raise ValueError(
                f"{cache} caches retraining for {have.get('tag')!r}, not {tag!r}; use a new cache_dir for another setup"
            )
    else:
        save_json(cfg, want)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1])


def lds(scores: Any, subsets: torch.Tensor, measurements: torch.Tensor) -> LDSResult:
    """Per-query Spearman correlation between measurements and ``-sum_{m in S} score(q, m)``.

    scores: [Q, N] (or a ``Scores``); subsets: [M, k]; measurements: [M, Q] or [M, R, Q]
    (averaged over the R seeds first).
    """
    values = torch.as_tensor(_values(scores)).double()
    subsets = torch.as_tensor(subsets, dtype=torch.int64)
    y = torch.as_tensor(measurements).double()
    if y.ndim == 3:
        y = y.mean(1)
    if values.ndim != 2:
        raise ValueError(f"scores must be [Q, N], got shape {tuple(values.shape)}")
    if y.ndim != 2 or y.shape[0] != subsets.shape[0] or y.shape[1] != values.shape[0]:
        raise ValueError(
            f"measurements have shape {tuple(y.shape)}, expected [M={subsets.shape[0]}, Q={values.shape[0]}] "
            "(or [M, R, Q]): one row per subset, one column per query in the order of the scores"
        )
    if int(subsets.max()) >= values.shape[1] or int(subsets.min()) < 0:
        raise ValueError(f"subsets index up to {int(subsets.max())}, but the scores cover N={values.shape[1]} examples")
    predicted = -values[:, subsets].sum(-1).T  # [M, Q]
    per_query = torch.tensor([_spearman(predicted[:, j].numpy(), y[:, j].numpy()) for j in range(y.shape[1])])
    c = correlation_summary(per_query)
    return LDSResult(c.mean, c.low, c.high, c.per_query, c.undefined, c.interval, predicted, y)


def _values(scores: Any) -> Any:
    """The [Q, N] matrix of a ``Scores`` (or anything with a tensor ``.values``), else ``scores`` itself."""
    if isinstance(scores, (torch.Tensor, np.ndarray)):
        return scores
    return getattr(scores, "values", scores)
