"""Fisher estimators, refinement and damping: seed-to-seed spread and accuracy of EK-FAC influence.

    python benchmarks/fisher.py              # digits, regression, LM; writes benchmarks/results/fisher.md
    python benchmarks/fisher.py --tasks digits --seeds 2 --subsets 20 --out ''   # a quick look

Per benchmark (``headwater.evaluate.trainers``) and for each of ``--seeds`` fit seeds:

- Table 1, each method with its *own* damping rule (0.1 x mean Lambda per layer, the default):
  the seed spread of mean(Lambda), of the damping, and of LDS, for plain sampling with one and
  with 4 draws (the paper's is one), ``fisher="topk"`` (the default) with 1 and 4 backward
  passes, ``fisher="importance"``, the exact Fisher where the task has one, and kronfluence's
  EK-FAC when installed, both at its default damping (a fixed 1e-8) and at its 0.1 x mean
  Lambda heuristic.
- Table 2, every method at one absolute damping lambda (0.1 x the mean eigenvalue of the exact
  Gauss-Newton, from the exact-Fisher EK-FAC; on the LM, which has no exact Fisher, from a
  4-pass topk fit): LDS and top-10 overlap with the dense exact damped Gauss-Newton influence
  (MLPs), for the estimators above, refinement (``refine_steps``; the full matrix, or per layer
  toward its block diagonal) from the default EK-FAC, the dense solve itself, and kronfluence's
  EK-FAC.
- Table 3, LDS against the damping scale for the mean, median and 10%-trimmed-mean rules (default fit).

LDS: ``--subsets`` random half subsets retrained under ``--retrain-seeds`` seeds (LM:
``--lm-subsets`` x ``--lm-retrain-seeds``), cached under ``--cache``; the LM's cache is the one
``benchmarks/accuracy.py`` fills, so copy ``runs/accuracy/lm`` there to skip ~9 min of retraining.
Threads are pinned to one (see ``benchmarks/accuracy.py`` for why).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from headwater import Attributor
from headwater.curvature import EigenCurvature
from headwater.evaluate import lds, retrain_measurements, sample_subsets
from headwater.evaluate.methods import kronfluence_available, kronfluence_scores, run_method
from headwater.evaluate.trainers import Benchmark, LMConfig, load_benchmark
from headwater.storage import atomic_write_text

KRONFLUENCE_DEFAULT = 1e-8  # kronfluence 1.0.1's ScoreArguments.damping_factor


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_lambda(an: Attributor) -> float:
    ops = [op for op in an.curvature.values() if isinstance(op, EigenCurvature)]
    return float(sum(op.lam.sum() for op in ops)) / sum(op.lam.numel() for op in ops)


def _trimmed_mean(lam: torch.Tensor, cut: float = 0.1) -> float:
    """Mean of Lambda without its largest and smallest 10%: robust to a few huge eigenvalues."""
    flat = lam.flatten().sort().values
    k = int(cut * flat.numel())
    return float(flat[k : flat.numel() - k].mean())


def _overlap(values: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of |top-k(values) ∩ top-k(reference)| / k."""
    a, b = values.topk(k, dim=1).indices, reference.topk(k, dim=1).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a))


class Run:
    """One benchmark: the retraining measurements, and helpers that time and score a method."""

    def __init__(self, bench: Benchmark, subsets: int, retrain_seeds: int, cache: Path):
        self.bench = bench
        self.retrain_seconds = 0.0
        self.damping = 0.0  # the absolute lambda of table 2, set once known
        self._kf: dict[int, tuple[dict, float]] = {}
        if subsets == 0:  # spread only: no retraining, no LDS
            self.y = None
            return
        self.subsets = sample_subsets(len(bench.train), subsets, 0.5, 0)
        t = time.perf_counter()
        tag = {**bench.config, "alpha": 0.5, "subset_seed": 0}
        self.y = retrain_measurements(bench.retrain, self.subsets, retrain_seeds, cache / bench.name, tag=tag)
        self.retrain_seconds = time.perf_counter() - t

    def lds(self, values: torch.Tensor) -> float | None:
        return None if self.y is None else lds(values, self.subsets, self.y).mean

    def kronfluence(self, seed: int) -> tuple[dict, float]:
        """kronfluence's scores at its default, its heuristic and table 2's damping (one fit per seed)."""
        if seed not in self._kf:
            t = time.perf_counter()
            keys = [KRONFLUENCE_DEFAULT, None, self.damping]
            values = kronfluence_scores(self.bench, keys, seed)
            self._kf[seed] = (
                {k: v.double() for k, v in zip(["default", "heuristic", "table2"], values)},
                (time.perf_counter() - t) / len(keys),
            )
        return self._kf[seed]

    def fit(self, fisher: str, samples: int, seed: int, top: int = 8) -> tuple[Attributor, float]:
        b = self.bench
        t = time.perf_counter()
        an = Attributor(b.model, task=b.task, modules=b.modules, fisher=fisher, samples=samples, top=top, seed=seed)
        an.fit(b.train, b.batch_size)
        return an, time.perf_counter() - t

    def score(self, an: Attributor, damping: float | None, **kw) -> tuple[torch.Tensor, float]:
        b = self.bench
        t = time.perf_counter()
        v = an.scores(b.queries, b.train, b.batch_size, damping=damping, **kw).values.double()
        return v, time.perf_counter() - t


def estimators(bench: Benchmark) -> list[tuple[str, str, int]]:
    """(label, fisher, samples) for the estimators this task supports; k = backward passes."""
    out = [
        ("sampled, k=1 (paper)", "sampled", 1),
        ("sampled, k=4", "sampled", 4),
        ("topk, k=1 (default)", "topk", 1),
        ("topk, k=4", "topk", 4),
    ]
    if bench.name != "regression":  # H = I: topk's signed coordinates are already the ideal draw
        out.append(("importance, k=1", "importance", 1))
    if bench.name in ("digits", "regression"):
        out.append(("exact", "exact", 1))
    return out


def table_spread(run: Run, seeds: int, log: Callable[[str], None]) -> list[str]:
    rows = [
        "| estimator | sd mean(Lambda) / mean | sd damping / mean | LDS (mean ± sd) | fit + score s |",
        "|---|---|---|---|---|",
    ]
    for label, fisher, samples in estimators(run.bench):
        lam, damp, ldss, secs = [], [], [], []
        for seed in range(1 if fisher == "exact" else seeds):
            an, t_fit = run.fit(fisher, samples, seed)
            values, t_score = run.score(an, None) if run.y is not None else (None, 0.0)
            lam.append(_mean_lambda(an))
            damp.append(statistics.mean(an.damping().values()))
            ldss += [] if values is None else [run.lds(values)]
            secs.append(t_fit + t_score)
        rel = lambda v: _sd(v) / statistics.mean(v)  # noqa: E731
        rows.append(f"| {label} | {rel(lam):.3f} | {rel(damp):.3f} | {_stats(ldss)} | {statistics.mean(secs):.2f} |")
        log(rows[-1])
    if run.y is not None:  # the default estimator at kronfluence's default damping, to separate the two
        ldss, secs = [], []
        for seed in range(seeds):
            an, t_fit = run.fit("topk", 1, seed)
            values, t_score = run.score(an, KRONFLUENCE_DEFAULT)
            ldss.append(run.lds(values))
            secs.append(t_fit + t_score)
        label = "topk, k=1 (default) at damping 1e-8 (kronfluence's default)"
        rows.append(f"| {label} | - | - | {_stats(ldss)} | {statistics.mean(secs):.2f} |")
        log(rows[-1])
    if kronfluence_available() and run.y is not None:
        for key, label in (
            ("default", "kronfluence EK-FAC, its default damping 1e-8"),
            ("heuristic", "kronfluence EK-FAC, its 0.1 x mean Lambda heuristic"),
        ):
            runs = [run.kronfluence(seed) for seed in range(seeds)]
            ldss = [run.lds(v[key]) for v, _ in runs]
            rows.append(f"| {label} | - | - | {_stats(ldss)} | {statistics.mean(t for _, t in runs):.2f} |")
            log(rows[-1])
    return rows


def table_accuracy(run: Run, seeds: int, damping: float, steps: list[int], log: Callable[[str], None]) -> list[str]:
    b = run.bench
    rows = ["| method | LDS (mean ± sd) | top-10 overlap with dense | s |", "|---|---|---|---|"]
    dense = None
    if b.name != "lm":  # the dense GN of the LM's tracked layers is too large to form
        t = time.perf_counter()
        dense = run_method(b, "exact", damping).values
        t_dense = time.perf_counter() - t
        rows.append(f"| dense exact damped GN | {run.lds(dense):.3f} | 1.000 | {t_dense:.1f} |")
        log(rows[-1])
    overlap = (lambda v: [_overlap(v, dense)]) if dense is not None else (lambda v: [])
    methods: list[tuple[str, str, int, int, str]] = [(lbl, f, k, 0, "full") for lbl, f, k in estimators(b)]
    methods += [
        (f"topk k=1 + refine {n} ({blocks})", "topk", 1, n, blocks) for blocks in ("full", "layer") for n in steps
    ]
    for label, fisher, samples, n, blocks in methods:
        ldss, over, secs = [], [], []
        for seed in range(1 if fisher == "exact" else seeds):
            an, t_fit = run.fit(fisher, samples, seed)
            values, t_score = run.score(an, damping, refine_steps=n, refine_blocks=blocks)
            ldss.append(run.lds(values))
            over += overlap(values)
            secs.append(t_fit + t_score)
        rows.append(f"| {label} | {_stats(ldss)} | {_stats(over)} | {statistics.mean(secs):.2f} |")
        log(rows[-1])
    if kronfluence_available():
        runs = [run.kronfluence(seed) for seed in range(seeds)]
        ldss = [run.lds(v["table2"]) for v, _ in runs]
        over = [o for v, _ in runs for o in overlap(v["table2"])]
        secs = statistics.mean(t for _, t in runs)
        rows.append(f"| kronfluence EK-FAC | {_stats(ldss)} | {_stats(over)} | {secs:.2f} |")
        log(rows[-1])
    return rows


def table_damping(run: Run, seeds: int, scales: list[float], log: Callable[[str], None]) -> list[str]:
    """LDS vs damping scale: lambda_l = scale x mean, median or trimmed mean of Lambda_l."""
    rules = {
        "mean": lambda lam: float(lam.mean()),
        "median": lambda lam: float(lam.median()),
        "trimmed mean": _trimmed_mean,
    }
    ldss: dict[tuple[str, float], list[float]] = {(r, s): [] for r in rules for s in scales}
    for seed in range(seeds):
        an, _ = run.fit("topk", 1, seed)
        default = an.damping
        for rule, stat in rules.items():
            for s in scales:
                an.damping = lambda d=None, s=s, stat=stat, ops=an.curvature: {
                    n: s * stat(op.lam) for n, op in ops.items()
                }
                ldss[(rule, s)].append(run.lds(run.score(an, None)[0]))
        an.damping = default
    rows = ["| rule | " + " | ".join(f"x {s:g}" for s in scales) + " |", "|---|" + "---|" * len(scales)]
    for rule in rules:
        rows.append(f"| {rule}(Lambda) | " + " | ".join(_stats(ldss[(rule, s)]) for s in scales) + " |")
        log(rows[-1])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="digits,regression,lm")
    p.add_argument("--seeds", type=int, default=5, help="fit seeds per sampled method")
    p.add_argument("--subsets", type=int, default=50, help="LDS subsets")
    p.add_argument("--retrain-seeds", type=int, default=1)
    p.add_argument("--refine", default="1,3,10", help="refinement step counts")
    p.add_argument("--scales", default="0.01,0.03,0.1,0.3,1", help="damping scales for table 3")
    p.add_argument("--lm-subsets", type=int, default=32, help="LDS subsets on the LM (retraining is costly)")
    p.add_argument("--lm-retrain-seeds", type=int, default=2)
    p.add_argument("--lm-queries", type=int, default=30, help="first K demo queries (as benchmarks/accuracy.py)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="runs/fisher")
    p.add_argument("--out", default="benchmarks/results/fisher.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/fisher.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t_all = time.perf_counter()
    out = ["## Fisher estimators, refinement and damping", "", f"Command: `{command}`", ""]

    def log(line: str) -> None:
        print(line, flush=True)

    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        t0 = time.perf_counter()
        lm = task == "lm"
        if lm:
            bench = load_benchmark("lm", cfg=LMConfig(n_queries=args.lm_queries))
            subsets, retrain_seeds = args.lm_subsets, args.lm_retrain_seeds
        else:
            bench = load_benchmark(task)
            subsets, retrain_seeds = args.subsets, args.retrain_seeds
        run = Run(bench, subsets, retrain_seeds, Path(args.cache))
        reference, _ = run.fit("topk", 4, 0) if lm else run.fit("exact", 1, 0)
        run.damping = damping = 0.1 * _mean_lambda(reference)
        head = (
            f"### {task}\n\n{len(bench.train)} training examples, {len(bench.queries)} queries; LDS over "
            f"{subsets} subsets x {retrain_seeds} retraining seed(s) "
            f"(retraining {run.retrain_seconds:.0f} s); "
            f"{args.seeds} fit seeds per sampled method; lambda for table 2 = {damping:.4g}"
            + (" (0.1 x mean Lambda of a 4-pass topk fit: the LM has no exact Fisher)." if lm else ".")
        )
        log(head)
        sections = [
            head,
            "",
            "Seed spread, each method with its own default damping (0.1 x mean Lambda per layer):",
            "",
        ]
        sections += table_spread(run, args.seeds, log)
        sections += ["", f"Accuracy at one absolute damping lambda = {damping:.4g}:", ""]
        steps = [] if lm else [int(s) for s in args.refine.split(",") if s]
        sections += table_accuracy(run, args.seeds, damping, steps, log)
        sections += ["", "LDS against the damping scale (default topk k=1 fit; mean ± sd over fit seeds):", ""]
        sections += table_damping(run, args.seeds, [float(s) for s in args.scales.split(",")], log)
        sections += ["", f"Task wall time {time.perf_counter() - t0:.0f} s.", ""]
        out += sections
    out.append(f"Total {(time.perf_counter() - t_all) / 60:.1f} min, {args.threads} thread(s).")
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
