"""The evaluation suite behind ``headwater evaluate`` and ``benchmarks/accuracy.py``.

One ``Suite`` holds a built-in benchmark, the common damping, and each method's scores
(computed once per fit seed and reused by every metric):

    suite = Suite(load_benchmark("digits"), methods=["identity", "ekfac", "lissa"], fit_seeds=3)
    suite.lds(num_subsets=100, seeds=3, cache_dir="runs/eval/digits")
    suite.pbrf(num_examples=100)
    print(suite.markdown())

Methods whose scores depend on a random draw (sampled-Fisher pseudo-labels, LiSSA's
minibatches) are run under ``fit_seeds`` seeds. A metric is first averaged per query over
those seeds, then summarized over queries (mean and 95% t-interval); the spread of the
overall mean across seeds is reported beside it, so a difference smaller than that spread
is noise, not a ranking.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lds import Correlation, correlation_summary, lds, retrain_measurements, sample_subsets
from .methods import METHODS, LiSSASettings, MethodResult, kronfluence_available, reference_damping, run_method
from .pbrf import PBRF, pearson_per_query
from .retrieval import retrieval
from .trainers import Benchmark

__all__ = ["Suite", "MetricRow", "DETERMINISTIC"]

# Methods whose scores do not depend on the seed: run once.
DETERMINISTIC = ("identity", "ekfac-exact", "exact")


@dataclass
class MetricRow:
    """One method's value of one metric: seed-averaged per-query summary and the spread over seeds."""

    summary: Correlation | None = None
    seed_sd: float = 0.0
    extra: dict = field(default_factory=dict)


class Suite:
    """Scores every method on one benchmark once, then evaluates LDS, PBRF and retrieval on them."""

    def __init__(
        self,
        bench: Benchmark,
        methods: list[str],
        fit_seeds: int = 3,
        damping: float | None = None,
        lissa: LiSSASettings | None = None,
        log: bool = True,
    ):
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
        if fit_seeds < 1:
            raise ValueError(f"fit_seeds must be at least 1, got {fit_seeds}")
        self.bench = bench
        self.log = log
        self.methods = [m for m in methods if m != "kronfluence" or kronfluence_available()]
        missing = "kronfluence is not installed (pip install 'headwater[peers]')"
        self.skipped = {m: missing for m in methods if m not in self.methods}
        self.fit_seeds = fit_seeds
        self.lissa = lissa or LiSSASettings()
        t = time.perf_counter()
        self.damping = reference_damping(bench) if damping is None else float(damping)
        self._say(f"damping lambda = {self.damping:.4g} ({time.perf_counter() - t:.1f} s)")
        self.results: dict[str, list[MethodResult]] = {}
        self.metrics: dict[str, dict[str, MetricRow]] = {}

    def _say(self, msg: str) -> None:
        if self.log:
            print(f"[{self.bench.name}] {msg}", flush=True)

    # ------------------------------------------------------------------ scores
    def scores(self, method: str) -> list[MethodResult]:
        """The method's results, one per fit seed (computed on first use)."""
        if method not in self.results:
            n = self.fit_seeds if method != "lissa" or self.lissa.seeds is None else self.lissa.seeds
            seeds = [0] if method in DETERMINISTIC else list(range(n))
            out = []
            for s in seeds:
                try:
                    r = run_method(self.bench, method, self.damping, seed=s, lissa=self.lissa)
                except (ValueError, NotImplementedError, ArithmeticError) as e:
                    # 'exact' on a large model, 'ekfac-exact' on a task without gauss_newton_losses,
                    # LiSSA diverging: report the method as skipped instead of losing the run
                    self.skipped[method] = str(e).split(";")[0]
                    self._say(f"{method}: skipped ({self.skipped[method]})")
                    out = []
                    break
                self._say(f"{method} seed {s}: {r.seconds:.1f} s")
                out.append(r)
            self.results[method] = out
        return self.results[method]

    def seconds(self, method: str) -> float:
        res = self.scores(method)
        return sum(r.seconds for r in res) / len(res) if res else float("nan")

    def _per_seed(self, name: str, per_query) -> None:
        """Fill ``metrics[name]`` from ``per_query(values) -> [Q] tensor`` for every method."""
        rows = self.metrics.setdefault(name, {})
        for m in self.methods:
            res = self.scores(m)
            if not res:
                continue
            per = torch.stack([per_query(r.values) for r in res])  # [seeds, Q]
            means = [float(p[torch.isfinite(p)].mean()) for p in per]
            sd = float(torch.tensor(means).std()) if len(means) > 1 else 0.0
            rows[m] = MetricRow(correlation_summary(per.mean(0)), sd)

    # ------------------------------------------------------------------ metrics
    def lds(
        self,
        num_subsets: int = 100,
        seeds: int = 3,
        alpha: float = 0.5,
        subset_seed: int = 0,
        cache_dir: str | Path | None = None,
    ) -> dict[str, MetricRow]:
        """LDS of every method against retraining on ``num_subsets`` subsets x ``seeds`` seeds."""
        subsets = sample_subsets(len(self.bench.train), num_subsets, alpha, subset_seed)
        t = time.perf_counter()
        tag = {**self.bench.config, "alpha": alpha, "subset_seed": subset_seed}
        total = num_subsets * seeds

        def progress(done: int, of: int) -> None:
            if self.log and (done % max(1, of // 10) == 0 or done == of):
                self._say(f"retraining {done}/{of} ({time.perf_counter() - t:.0f} s)")

        y = retrain_measurements(self.bench.retrain, subsets, seeds, cache_dir, tag=tag, progress=progress)
        self.retrain_seconds = time.perf_counter() - t
        self._say(f"retraining: {total} runs in {self.retrain_seconds:.1f} s (cached runs are free)")
        self._per_seed("lds", lambda v: lds(v, subsets, y).per_query)
        self.lds_setup = {"subsets": num_subsets, "seeds": seeds, "alpha": alpha, "subset_seed": subset_seed}
        return self.metrics["lds"]

    def pbrf(self, num_examples: int = 100, seed: int = 0) -> dict[str, MetricRow]:
        """Pearson correlation with PBRF scores on ``num_examples`` random training examples."""
        n = len(self.bench.train)
        gen = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(n, generator=gen)[: min(num_examples, n)].tolist())
        t = time.perf_counter()
        solver = PBRF(self.bench.model, self.bench.task, self.bench.train, self.damping, self.bench.modules)
        ref = solver.scores(self.bench.queries, idx)
        self.pbrf_seconds = time.perf_counter() - t
        bad = len(ref.converged) - sum(ref.converged)
        self._say(f"PBRF: {len(idx)} examples in {self.pbrf_seconds:.1f} s, {bad} not converged to rtol")
        self.pbrf_setup = {"examples": len(idx), "epsilon": solver.epsilon, "not_converged": bad}
        self._per_seed("pbrf", lambda v: pearson_per_query(v, ref).per_query)
        return self.metrics["pbrf"]

    def retrieval(self, ks: tuple[int, ...] = (1, 10)) -> dict[str, MetricRow]:
        """recall@k and MRR of the documents stating each query's fact (LM benchmark)."""
        if self.bench.relevant is None:
            raise ValueError(f"benchmark {self.bench.name!r} has no planted facts; retrieval needs the 'lm' benchmark")
        rows = self.metrics.setdefault("retrieval", {})
        for m in self.methods:
            res = [retrieval(r.values, self.bench.relevant, ks) for r in self.scores(m)]
            if not res:
                continue
            mrr = [r.mrr for r in res]
            extra = {f"recall@{k}": sum(r.recall[k] for r in res) / len(res) for k in ks}
            extra["mrr"] = sum(mrr) / len(mrr)
            rows[m] = MetricRow(None, float(torch.tensor(mrr).std()) if len(mrr) > 1 else 0.0, extra)
        return rows

    # ------------------------------------------------------------------ report
    def markdown(self) -> str:
        """One table: a row per method, a column per metric computed so far, and the wall time."""
        cols = [c for c in ("lds", "pbrf") if c in self.metrics]
        has_ret = "retrieval" in self.metrics
        head = ["method"] + [f"{c.upper()} (95% CI over queries)" for c in cols]
        head += [f"{c.upper()} sd over fit seeds" for c in cols]
        ks = []
        if has_ret:
            any_row = next(iter(self.metrics["retrieval"].values()), None)
            ks = [k for k in (any_row.extra if any_row else {}) if k.startswith("recall@")]
            head += ks + ["MRR"]
        head.append("fit + score time (s)")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.methods:
            if m in self.skipped and not self.results.get(m):
                continue
            row = [m]
            for c in cols:
                r = self.metrics[c].get(m)
                row.append(str(r.summary) if r else "n/a")
            for c in cols:
                r = self.metrics[c].get(m)
                row.append(f"{r.seed_sd:.3f}" if r and len(self.results.get(m, [])) > 1 else "-")
            if has_ret:
                r = self.metrics["retrieval"].get(m)
                row += [f"{r.extra[k]:.3f}" if r else "n/a" for k in ks]
                row.append(f"{r.extra['mrr']:.3f}" if r else "n/a")
            sec = self.seconds(m)
            row.append("n/a" if math.isnan(sec) else f"{sec:.2f}")
            lines.append("| " + " | ".join(row) + " |")
        for m, why in self.skipped.items():
            lines.append(f"\n{m}: skipped, {why}")
        return "\n".join(lines)
