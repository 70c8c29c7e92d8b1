"""Fisher estimators, refinement and damping: seed-to-seed spread and accuracy of EK-FAC influence.

    python benchmarks/fisher.py              # digits + regression, writes benchmarks/results/fisher.md
    python benchmarks/fisher.py --tasks digits --seeds 2 --subsets 20 --out ''   # a quick look

Per benchmark (``headwater.evaluate.trainers``) and for each of ``--seeds`` fit seeds:

- Table 1, each method with its *own* damping rule (0.1 x mean Lambda per layer, the default):
  the seed spread of mean(Lambda), of the damping, and of LDS, for plain sampling with one draw
  (the paper), plain sampling with k draws, ``fisher="topk"`` with the same k backward passes,
  and the exact Fisher where the task has one.
- Table 2, every method at one absolute damping lambda (0.1 x the mean eigenvalue of the exact
  Gauss-Newton, from the exact-Fisher EK-FAC): LDS and top-10 overlap with the dense exact damped
  Gauss-Newton influence, for the estimators above, refinement (``refine_steps``) from the
  one-draw EK-FAC, the dense solve itself, and kronfluence's EK-FAC when installed.
- Table 3, LDS against the damping scale for the mean rule and the median rule (one-draw fit).

LDS: ``--subsets`` random half subsets retrained under ``--retrain-seeds`` seeds, cached under
``--cache``. Threads are pinned to one (see ``benchmarks/accuracy.py`` for why).
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
from headwater.evaluate.methods import kronfluence_available, run_method
from headwater.evaluate.trainers import Benchmark, LMConfig, load_benchmark
from headwater.storage import atomic_write_text

TOPK_SAMPLES = 4  # k backward passes: top-3 exact + 1 tail draw, vs 4 plain draws


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


def _overlap(values: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of |top-k(values) ∩ top-k(reference)| / k."""
    a, b = values.topk(k, dim=1).indices, reference.topk(k, dim=1).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a))


class Run:
    """One benchmark: the retraining measurements, and helpers that time and score a method."""

    def __init__(self, bench: Benchmark, subsets: int, retrain_seeds: int, cache: Path):
        self.bench = bench
        self.retrain_seconds = 0.0
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

    def fit(self, fisher: str, samples: int, seed: int) -> tuple[Attributor, float]:
        b = self.bench
        t = time.perf_counter()
        an = Attributor(b.model, task=b.task, modules=b.modules, fisher=fisher, samples=samples, seed=seed)
        an.fit(b.train, b.batch_size)
        return an, time.perf_counter() - t

    def score(self, an: Attributor, damping: float | None, **kw) -> tuple[torch.Tensor, float]:
        b = self.bench
        t = time.perf_counter()
        v = an.scores(b.queries, b.train, b.batch_size, damping=damping, **kw).values.double()
        return v, time.perf_counter() - t


def estimators(bench: Benchmark) -> list[tuple[str, str, int]]:
    """(label, fisher, samples) for the estimators this task supports."""
    out = [("sampled, k=1 (paper)", "sampled", 1), (f"sampled, k={TOPK_SAMPLES}", "sampled", TOPK_SAMPLES)]
    if bench.name != "regression":  # topk and exact need a softmax output
        out.append((f"topk, k={TOPK_SAMPLES}", "topk", TOPK_SAMPLES))
    if bench.name in ("digits", "regression"):
        out.append(("exact", "exact", 1))
    if bench.name == "lm":  # top-m of a vocabulary needs more than 3 to cover a peaked softmax's mass
        out += [("sampled, k=16", "sampled", 16), ("topk, k=16", "topk", 16)]
    return out


def table_spread(run: Run, seeds: int, log: Callable[[str], None]) -> list[str]:
    rows = ["| estimator | sd mean(Lambda) / mean | sd damping / mean | LDS (mean ± sd) | fit + score s |",
            "|---|---|---|---|---|"]  # fmt: skip
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
    return rows


def table_accuracy(run: Run, seeds: int, damping: float, steps: list[int], log: Callable[[str], None]) -> list[str]:
    b = run.bench
    rows = ["| method | LDS (mean ± sd) | top-10 overlap with dense | s |", "|---|---|---|---|"]
    t = time.perf_counter()
    dense = run_method(b, "exact", damping).values
    t_dense = time.perf_counter() - t
    rows.append(f"| dense exact damped GN | {run.lds(dense):.3f} | 1.000 | {t_dense:.1f} |")
    log(rows[-1])
    methods: list[tuple[str, str, int, int]] = [(lbl, f, k, 0) for lbl, f, k in estimators(b)]
    methods += [(f"sampled k=1 + refine {n} (full)", "sampled", 1, n) for n in steps]
    for label, fisher, samples, n in methods:
        ldss, over, secs = [], [], []
        for seed in range(1 if fisher == "exact" else seeds):
            an, t_fit = run.fit(fisher, samples, seed)
            values, t_score = run.score(an, damping, refine_steps=n)
            ldss.append(run.lds(values))
            over.append(_overlap(values, dense))
            secs.append(t_fit + t_score)
        rows.append(f"| {label} | {_stats(ldss)} | {_stats(over)} | {statistics.mean(secs):.2f} |")
        log(rows[-1])
    if kronfluence_available():
        ldss, over, secs = [], [], []
        for seed in range(seeds):
            r = run_method(b, "kronfluence", damping, seed)
            ldss.append(run.lds(r.values))
            over.append(_overlap(r.values, dense))
            secs.append(r.seconds)
        rows.append(f"| kronfluence EK-FAC | {_stats(ldss)} | {_stats(over)} | {statistics.mean(secs):.2f} |")
        log(rows[-1])
    return rows


def table_damping(run: Run, seeds: int, scales: list[float], log: Callable[[str], None]) -> list[str]:
    """LDS vs damping scale: lambda_l = scale x mean(Lambda_l) or scale x median(Lambda_l)."""
    rules = {"mean": lambda lam: float(lam.mean()), "median": lambda lam: float(lam.median())}
    ldss: dict[tuple[str, float], list[float]] = {(r, s): [] for r in rules for s in scales}
    for seed in range(seeds):
        an, _ = run.fit("sampled", 1, seed)
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
    p.add_argument("--tasks", default="digits,regression")
    p.add_argument("--seeds", type=int, default=5, help="fit seeds per sampled method")
    p.add_argument("--subsets", type=int, default=50, help="LDS subsets")
    p.add_argument("--retrain-seeds", type=int, default=1)
    p.add_argument("--refine", default="1,3,10", help="refinement step counts")
    p.add_argument("--scales", default="0.01,0.03,0.1,0.3,1", help="damping scales for table 3")
    p.add_argument("--lm-small", action="store_true", help="the small demo model for the 'lm' task")
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
        if task == "lm":  # seed spread of the estimators only: LDS needs LM retraining, see accuracy.py
            bench = load_benchmark("lm", cfg=LMConfig(small=args.lm_small))
            run = Run(bench, 0, 0, Path(args.cache))
            head = (
                f"### lm ({'small' if args.lm_small else 'full'} demo GPT-2)\n\n{len(bench.train)} training "
                f"documents; {args.seeds} fit seeds; seed spread only (no LDS), default damping."
            )
            log(head)
            out += [
                head,
                "",
                *table_spread(run, args.seeds, log),
                "",
                f"Task wall time {time.perf_counter() - t0:.0f} s.",
                "",
            ]
            continue
        bench = load_benchmark(task)
        run = Run(bench, args.subsets, args.retrain_seeds, Path(args.cache))
        exact, _ = run.fit("exact", 1, 0)
        damping = 0.1 * _mean_lambda(exact)
        head = (
            f"### {task}\n\n{len(bench.train)} training examples, {len(bench.queries)} queries; LDS over "
            f"{args.subsets} subsets x {args.retrain_seeds} retraining seed(s) "
            f"(retraining {run.retrain_seconds:.0f} s); "
            f"{args.seeds} fit seeds per sampled method; lambda for table 2 = {damping:.4g}."
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
        steps = [int(s) for s in args.refine.split(",") if s]
        sections += table_accuracy(run, args.seeds, damping, steps, log)
        sections += ["", "LDS against the damping scale (sampled k=1 fit; mean ± sd over fit seeds):", ""]
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
