"""Accuracy benchmark: does each method's score predict retraining, the PBRF and planted facts?

    python benchmarks/accuracy.py                        # all three tasks, writes benchmarks/results/accuracy.md
    python benchmarks/accuracy.py --tasks digits --subsets 20 --seeds 1 --fit-seeds 1   # a quick look

Tasks (``headwater.evaluate.trainers``): a 64-32-10 MLP on sklearn digits, a 10-32-1 MLP on
sklearn diabetes, and the demo GPT-2 on the planted-fact corpus. Methods: headwater's identity,
diagonal, K-FAC and EK-FAC (the default Fisher estimate, ``fisher="auto"``: signed top-k),
EK-FAC with the paper's single sampled label (``ekfac-sampled``) and with the exact Fisher, LiSSA
over all tracked parameters, the dense exact damped Gauss-Newton inverse (MLPs), and
kronfluence's EK-FAC when it is installed. Every method scores the same trained model, data
and queries with the same absolute damping (0.1 x the mean eigenvalue of G).

Metrics: LDS on every task (M subsets at alpha = 0.5, several retraining seeds, cached under
``--cache`` so a rerun resumes), Pearson correlation with the PBRF on the MLPs, and recall@k /
MRR of the fact-stating documents on the LM. Sampling methods run under ``--fit-seeds`` seeds;
tables give the seed-averaged value and the spread over seeds.

Threads are pinned to one (``--threads``): torch.func's batched products used by LiSSA and the
references slow down by two orders of magnitude when threads oversubscribe a shared CPU, and
one thread keeps the per-method wall times comparable between methods.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from headwater.evaluate.methods import LiSSASettings
from headwater.evaluate.suite import Suite
from headwater.evaluate.trainers import LMConfig, load_benchmark
from headwater.storage import atomic_write_text

MLP_METHODS = ["identity", "diagonal", "kfac", "ekfac", "ekfac-sampled", "ekfac-exact", "lissa", "exact", "kronfluence"]
LM_METHODS = ["identity", "diagonal", "kfac", "ekfac", "ekfac-sampled", "lissa", "kronfluence"]


def _mean(suite: Suite, metric: str, method: str) -> float | None:
    row = suite.metrics.get(metric, {}).get(method)
    return row.summary.mean if row is not None and row.summary is not None else None


def targets(suites: dict[str, Suite]) -> list[str]:
    """The issue's accuracy targets, each marked met / missed / not measured, with the numbers."""
    out = ["| target | task | result | numbers |", "|---|---|---|---|"]

    def line(target: str, task: str, ok: bool | None, numbers: str) -> None:
        verdict = "not measured" if ok is None else ("met" if ok else "**missed**")
        out.append(f"| {target} | {task} | {verdict} | {numbers} |")

    for task, s in suites.items():
        ek, kf, ident = (_mean(s, "lds", m) for m in ("ekfac", "kronfluence", "identity"))
        if kf is None:
            line("headwater EK-FAC LDS >= kronfluence EK-FAC LDS", task, None, "kronfluence not run")
        else:
            sd = max(s.metrics["lds"]["ekfac"].seed_sd, s.metrics["lds"]["kronfluence"].seed_sd)
            numbers = f"{ek:.3f} vs {kf:.3f} (seed sd {sd:.3f})"
            line("headwater EK-FAC LDS >= kronfluence EK-FAC LDS", task, ek >= kf, numbers)
            tk = _mean(s, "lds", "ekfac-sampled")
            if tk is not None:
                numbers = f"{tk:.3f} vs {kf:.3f}"
                line("... with the paper's single sampled label", task, tk >= kf, numbers)
        if ek is not None and ident is not None:
            line("EK-FAC LDS > identity LDS", task, ek > ident, f"{ek:.3f} vs {ident:.3f}")
        if "pbrf" in s.metrics:
            ep, lp = _mean(s, "pbrf", "ekfac"), _mean(s, "pbrf", "lissa")
            if ep is not None and lp is not None:
                line("EK-FAC PBRF r >= LiSSA PBRF r - 0.05", task, ep >= lp - 0.05, f"{ep:.3f} vs {lp:.3f}")
    return out


SWEEP_METHODS = ["identity", "kfac", "ekfac", "ekfac-exact", "lissa", "exact"]


def pbrf_sweep(base: Suite, multipliers: list[float], examples: int) -> str:
    """PBRF correlation at larger dampings (one fit seed): where does EK-FAC catch up?"""
    t0 = time.perf_counter()
    methods = [m for m in SWEEP_METHODS if m in base.methods]
    cols: dict[float, dict] = {}
    for mult in [1.0, *multipliers]:
        s = Suite(base.bench, methods, fit_seeds=1, damping=base.damping * mult, lissa=base.lissa, log=False)
        cols[mult] = s.pbrf(num_examples=examples)
    head = ["method"] + [f"lambda x {m:g}" for m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [f"{cols[k][m].summary.mean:.3f}" if m in cols[k] else "n/a" for k in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return (
        f"PBRF correlation on {base.bench.name} against damping (lambda = {base.damping:.4g}; {examples} "
        f"examples, fit seed 0; {time.perf_counter() - t0:.0f} s):\n\n" + "\n".join(lines) + "\n"
    )


def machine() -> str:
    try:
        import kronfluence

        kf = kronfluence.__version__
    except Exception:
        kf = "not installed"
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU cores shared with other jobs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, kronfluence {kf}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="digits,regression,lm")
    p.add_argument("--subsets", type=int, default=100, help="LDS subsets M on the MLP tasks")
    p.add_argument("--seeds", type=int, default=3, help="retraining seeds per subset on the MLP tasks")
    p.add_argument("--lm-subsets", type=int, default=32, help="LDS subsets on the LM (retraining is costly)")
    p.add_argument("--lm-seeds", type=int, default=2, help="retraining seeds per subset on the LM")
    p.add_argument("--pbrf-examples", type=int, default=100)
    p.add_argument("--fit-seeds", type=int, default=3, help="seeds for sampling methods on the MLP tasks")
    p.add_argument("--lm-fit-seeds", type=int, default=3)
    p.add_argument("--lissa-depth", type=int, default=2000)
    p.add_argument("--lm-lissa-depth", type=int, default=100)
    p.add_argument("--lm-lissa-batch", type=int, default=8)
    p.add_argument("--lm-queries", type=int, default=30, help="first K demo queries (LiSSA costs Q x depth)")
    p.add_argument(
        "--pbrf-sweep", default="10,100", help="damping multipliers for the PBRF sensitivity table ('' to skip)"
    )
    p.add_argument("--sweep-examples", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-kronfluence", action="store_true")
    p.add_argument("--cache", default="runs/accuracy", help="retraining cache (resumable)")
    p.add_argument("--out", default="benchmarks/results/accuracy.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t_all = time.perf_counter()
    suites: dict[str, Suite] = {}
    sections: list[str] = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        t0 = time.perf_counter()
        lm = task == "lm"
        bench = load_benchmark(task, cfg=LMConfig(n_queries=args.lm_queries)) if lm else load_benchmark(task)
        methods = [m for m in (LM_METHODS if lm else MLP_METHODS) if m != "kronfluence" or not args.no_kronfluence]
        if lm:
            lissa = LiSSASettings(depth=args.lm_lissa_depth, batch_size=args.lm_lissa_batch, seeds=1)
        else:
            lissa = LiSSASettings(depth=args.lissa_depth, batch_size=bench.batch_size)
        suite = Suite(bench, methods, fit_seeds=args.lm_fit_seeds if lm else args.fit_seeds, lissa=lissa)
        cache = Path(args.cache) / task
        if lm:
            suite.lds(num_subsets=args.lm_subsets, seeds=args.lm_seeds, cache_dir=cache)
            suite.retrieval(ks=(1, 10))
        else:
            suite.lds(num_subsets=args.subsets, seeds=args.seeds, cache_dir=cache)
            suite.pbrf(num_examples=args.pbrf_examples)
        suites[task] = suite
        setup = suite.lds_setup
        desc = (
            f"### {task}\n\n{len(bench.train)} training examples, {len(bench.queries)} queries, "
            f"{sum(p.numel() for p in bench.model.parameters())} parameters; damping lambda = {suite.damping:.4g}; "
            f"LDS over {setup['subsets']} subsets x {setup['seeds']} retraining seed(s) at alpha = {setup['alpha']} "
            f"(retraining {suite.retrain_seconds:.0f} s, cached runs free); "
        )
        if lm:
            desc += f"sampling methods over {suite.fit_seeds} fit seed(s); LiSSA depth {lissa.depth}, "
            desc += f"batch {lissa.batch_size}."
        else:
            ps = suite.pbrf_setup
            desc += (
                f"PBRF on {ps['examples']} training examples (eps = {ps['epsilon']:.3g}, {suite.pbrf_seconds:.0f} s, "
                f"{ps['not_converged']} not converged); sampling methods over {suite.fit_seeds} fit seeds; "
                f"LiSSA depth {lissa.depth}, batch {lissa.batch_size}."
            )
        sections.append(f"{desc} Task wall time {time.perf_counter() - t0:.0f} s.\n\n{suite.markdown()}\n")
        print(f"\n{sections[-1]}", flush=True)
        if not lm and args.pbrf_sweep:
            sections.append(pbrf_sweep(suite, [float(x) for x in args.pbrf_sweep.split(",")], args.sweep_examples))
            print(f"\n{sections[-1]}", flush=True)
    total = time.perf_counter() - t_all
    report = [
        "## Accuracy",
        "",
        f"Command: `{command}` ({total / 60:.1f} min).",
        "",
        f"Machine: {machine()}.",
        "",
        *sections,
        "### Targets",
        "",
        *targets(suites),
        "",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
        print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
