"""``headwater evaluate``: LDS, PBRF and planted-fact retrieval on the built-in benchmarks.

    headwater evaluate lds --task digits --subsets 100 --seeds 3 --out runs/evaluate
    headwater evaluate pbrf --task regression --examples 100
    headwater evaluate retrieval --task lm --methods identity,ekfac

Each command prints a markdown table and writes it, with the settings, to
``OUT/TASK/<command>.md`` and ``.json``. Retraining for LDS is cached under
``OUT/TASK/retrain-...``; rerunning after an interruption resumes it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from .common import new_app, run_command, setup

__all__ = ["evaluate_app"]

evaluate_app = new_app(
    None, "Measure how well attribution scores predict retraining (LDS), the PBRF, and planted facts."
)

BENCHMARKS = ("digits", "regression", "lm")  # headwater.evaluate.trainers.BENCHMARKS, without importing torch
DEFAULT_METHODS = "identity,diagonal,kfac,ekfac,lissa"

TaskOpt = typer.Option("digits", "--task", help=f"Built-in benchmark: {', '.join(BENCHMARKS)}.")
MethodsOpt = typer.Option(DEFAULT_METHODS, "--methods", help="Comma-separated methods, e.g. identity,ekfac,lissa.")
OutOpt = typer.Option(Path("runs/evaluate"), "--out", help="Directory for results and the retraining cache.")
FitSeedsOpt = typer.Option(3, "--fit-seeds", min=1, help="Seeds for sampling methods (pseudo-labels, LiSSA batches).")
DepthOpt = typer.Option(2000, "--lissa-depth", min=1, help="LiSSA recursion depth.")
ThreadsOpt = typer.Option(1, "--threads", min=1, help="torch CPU threads (1 avoids oversubscribing shared machines).")


def _methods(spec: str) -> list[str]:
    from ..evaluate.methods import METHODS as KNOWN

    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in KNOWN]
    if not methods or unknown:
        raise typer.BadParameter(f"unknown method(s) {unknown or spec!r}; choose from {', '.join(KNOWN)}")
    return methods


def _suite(task: str, methods: str, fit_seeds: int, depth: int, threads: int) -> Any:
    import torch

    from ..evaluate.methods import LiSSASettings
    from ..evaluate.suite import Suite
    from ..evaluate.trainers import BENCHMARKS as KNOWN
    from ..evaluate.trainers import load_benchmark

    if task not in KNOWN:
        raise typer.BadParameter(f"--task {task!r} is unknown; choose one of {', '.join(KNOWN)}")
    chosen = _methods(methods)  # before training anything
    torch.set_num_threads(threads)
    typer.echo(f"[{task}] training the benchmark model ...")
    return Suite(load_benchmark(task), chosen, fit_seeds=fit_seeds, lissa=LiSSASettings(depth=depth))


def _report(suite: Any, out: Path, command: str, settings: dict) -> None:
    from ..storage import atomic_write_text, save_json

    table = suite.markdown()
    typer.echo("\n" + table)
    folder = out / suite.bench.name
    atomic_write_text(folder / f"{command}.md", f"settings: {settings}\n\n{table}\n")
    rows = {
        metric: {
            m: {
                "mean": r.summary.mean if r.summary else None,
                "low": r.summary.low if r.summary else None,
                "high": r.summary.high if r.summary else None,
                "seed_sd": r.seed_sd,
                **r.extra,
            }
            for m, r in per.items()
        }
        for metric, per in suite.metrics.items()
    }
    seconds = {m: suite.seconds(m) for m in suite.results}
    clean = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
    save_json(
        folder / f"{command}.json",
        {
            "settings": settings,
            "damping": suite.damping,
            "metrics": {k: {m: {f: clean(v) for f, v in d.items()} for m, d in per.items()} for k, per in rows.items()},
            "seconds": {m: clean(s) for m, s in seconds.items()},
            "skipped": suite.skipped,
        },
    )
    typer.echo(f"\nwritten to {folder}/{command}.md and .json")


@evaluate_app.command("lds")
def lds_command(
    task: str = TaskOpt,
    subsets: int = typer.Option(100, "--subsets", min=3, help="Number of random training subsets M."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Retraining seeds per subset."),
    alpha: float = typer.Option(0.5, "--alpha", min=0.01, max=0.99, help="Subset size as a fraction of the data."),
    methods: str = MethodsOpt,
    out: Path = OutOpt,
    fit_seeds: int = FitSeedsOpt,
    lissa_depth: int = DepthOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Linear datamodeling score: Spearman correlation between predicted and retrained query losses."""

    def body() -> None:
        suite = _suite(task, methods, fit_seeds, lissa_depth, threads)
        cache = out / task / f"retrain-alpha{alpha:g}-seed0"
        suite.lds(num_subsets=subsets, seeds=seeds, alpha=alpha, cache_dir=cache)
        settings = {"task": task, "subsets": subsets, "seeds": seeds, "alpha": alpha, "methods": methods}
        _report(suite, out, "lds", settings)

    run_command(*setup(False, False)[:2], body)


@evaluate_app.command("pbrf")
def pbrf_command(
    task: str = TaskOpt,
    examples: int = typer.Option(100, "--examples", min=3, help="Training examples to solve the PBRF for."),
    methods: str = MethodsOpt,
    out: Path = OutOpt,
    fit_seeds: int = FitSeedsOpt,
    lissa_depth: int = DepthOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Pearson correlation with the proximal Bregman response function (small models)."""

    def body() -> None:
        suite = _suite(task, methods, fit_seeds, lissa_depth, threads)
        suite.pbrf(num_examples=examples)
        _report(suite, out, "pbrf", {"task": task, "examples": examples, "methods": methods})

    run_command(*setup(False, False)[:2], body)


@evaluate_app.command("retrieval")
def retrieval_command(
    task: str = typer.Option("lm", "--task", help="Benchmark with planted facts (only 'lm')."),
    k: str = typer.Option("1,10", "--k", help="Comma-separated cut-offs for recall@k."),
    methods: str = MethodsOpt,
    out: Path = OutOpt,
    fit_seeds: int = FitSeedsOpt,
    lissa_depth: int = DepthOpt,
    threads: int = ThreadsOpt,
) -> None:
    """recall@k and MRR of the documents that state each query's planted fact."""
    try:
        ks = tuple(int(x) for x in k.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"--k must be comma-separated integers such as 1,10, got {k!r}") from e
    if task != "lm":
        raise typer.BadParameter(f"--task {task!r} has no planted facts; retrieval runs on 'lm'")

    def body() -> None:
        suite = _suite(task, methods, fit_seeds, lissa_depth, threads)
        suite.retrieval(ks)
        _report(suite, out, "retrieval", {"task": task, "k": list(ks), "methods": methods})

    run_command(*setup(False, False)[:2], body)
