"""The ``headwater`` command: from a local model and a data file to a report, without Python.

    headwater demo --out headwater-demo
    headwater fit --model runs/gpt2 --data train.jsonl --workdir runs/a
    headwater score --workdir runs/a --queries queries.jsonl      # -> runs/a/results/<run>/
    headwater report runs/a/results/<run>        # rebuild its report.html (no model needed)
    headwater inspect runs/a                     # what the workdir holds
    headwater verify runs/a                      # is every artifact intact and current

Each command validates, then calls one function of ``headwater.workflow``; see
``cli.common`` for the error contract. Nothing heavy is imported until a command runs, so
``--help`` answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from .common import STATE, BatchOpt, DebugOpt, DeviceOpt, QuietOpt, WorkdirOpt, echo_top, new_app, run_command, setup
from .evaluate import evaluate_app
from .index import index_app

__all__ = ["app", "main"]

app = new_app("headwater", "Which training examples made the model behave like this? EK-FAC influence functions.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"headwater {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Which training examples made the model behave like this? EK-FAC influence functions.

    Start with `headwater demo`; then `fit`, `score`, `report` and `inspect` on your own model.
    """
    STATE["quiet"], STATE["debug"] = quiet, debug


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for the model, data, workdir and report.html.")
    ] = Path("headwater-demo"),
    small: Annotated[
        bool, typer.Option("--small", help="Reduced corpus and model (also HEADWATER_DEMO_SMALL=1); for tests.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for the corpus, the model and the fit.")] = 0,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the built-in demo: synthetic facts corpus, tiny GPT-2, EK-FAC, report. No network.

    Trains a tokenizer and a small GPT-2 on a corpus of facts about fictional people, fits
    EK-FAC on its MLP layers, scores one query per fact, prints the top 3 training documents
    per query and the recall@10 of the documents that state the fact, and writes
    OUT/report.html.
    """
    quiet, debug, _ = setup(quiet, debug)

    def body() -> None:
        from ..demo import demo_is_small, run_demo

        run_demo(out, small=small or demo_is_small(), quiet=quiet, seed=seed)

    run_command(quiet, debug, body)


@app.command()
def fit(
    model: Annotated[Path, typer.Option("--model", "-m", help="Local Hugging Face model directory.")],
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Training data: JSONL with 'text', plain text, parquet or arrow.")
    ],
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Where the factors and settings are saved.")],
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory, if not saved with the model.")] = None,
    task: Annotated[
        str,
        typer.Option(
            help="causal-lm (prompt/completion, text), seq-cls ({text, label}) or seq2seq ({source, target})."
        ),
    ] = "causal-lm",
    modules: Annotated[
        str,
        typer.Option(
            help="'mlp' (MLP projections, MoE experts), 'all' (every supported layer; on a PEFT model its adapters), "
            "'base', 'adapters' or comma-separated names."
        ),
    ] = "mlp",
    strategy: Annotated[str, typer.Option(help="ekfac, kfac, diagonal or identity.")] = "ekfac",
    fisher: Annotated[
        str,
        typer.Option(
            help="auto (= topk), topk (top labels exactly + a tail draw), importance (reweighted draws), "
            "sampled (the paper's single draw) or empirical."
        ),
    ] = "auto",
    samples: Annotated[int, typer.Option(min=1, help="Pseudo-label backward passes per batch (x the cost).")] = 1,
    top: Annotated[int, typer.Option(min=1, help="Labels per token that topk takes exactly.")] = 8,
    max_length: Annotated[
        int | None,
        typer.Option("--max-length", min=2, help="Truncate documents to N tokens (default: the model's context)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for the Fisher's pseudo-labels.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (as saved).")] = "float32",
    overwrite: Annotated[
        bool, typer.Option(help="Remove what headwater wrote in the workdir (factors, scores, index) and refit.")
    ] = False,
    keep_covariance: Annotated[
        bool, typer.Option("--keep-covariance", help="Keep covariance.safetensors after the fit (the raw sums).")
    ] = False,
    allow_large: Annotated[
        bool, typer.Option("--allow-large", help="Fit Kronecker factors wider than 8192 (e.g. a vocabulary head).")
    ] = False,
    fit_examples: Annotated[
        int | None,
        typer.Option(
            "--fit-examples", min=1, help="Fit the factors on a seeded sample of N documents (large corpora)."
        ),
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fit the curvature (covariances, eigendecomposition, eigenvalue correction) into a workdir.

    Long only in its signature: one typer option per setting, each with its help text.
    """
    quiet, debug, log = setup(quiet, debug)

    def body() -> None:
        from ..workflow import fit_workdir

        fit_workdir(
            model,
            data,
            workdir,
            tokenizer=tokenizer,
            task=task,
            modules=modules,
            strategy=strategy,
            fisher=fisher,
            samples=samples,
            top=top,
            max_length=max_length,
            batch_size=batch_size,
            seed=seed,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            keep_covariance=keep_covariance,
            allow_large=allow_large,
            fit_examples=fit_examples,
            progress=not quiet,
            log=log,
        )

    run_command(quiet, debug, body)


@app.command()
def plan(
    model: Annotated[Path, typer.Option("--model", "-m", help="Local Hugging Face model directory.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Training data, as for `headwater fit`.")],
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory, if not saved with the model.")] = None,
    task: Annotated[str, typer.Option(help="causal-lm, seq-cls or seq2seq.")] = "causal-lm",
    modules: Annotated[str, typer.Option(help="As for `headwater fit`.")] = "mlp",
    strategy: Annotated[str, typer.Option(help="ekfac, kfac, diagonal or identity.")] = "ekfac",
    max_length: Annotated[int | None, typer.Option("--max-length", min=2, help="As for `headwater fit`.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per batch.")] = 8,
    queries: Annotated[int, typer.Option(min=0, help="Queries to plan a scoring run for (0: the fit only).")] = 0,
    query_rank: Annotated[int, typer.Option("--query-rank", min=0, help="As for `headwater score`.")] = 32,
    per_token: Annotated[bool, typer.Option("--per-token", help="Plan [Q, N, T] per-token scores.")] = False,
    index_dim: Annotated[int | None, typer.Option("--index-dim", min=1, help="Plan an index of this dim.")] = None,
    memory: Annotated[
        str | None, typer.Option(help="A memory budget such as 16GB: print the largest batch size that fits.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (as saved).")] = "float32",
    debug: DebugOpt = False,
) -> None:
    """Memory, disk and time each stage will need, from exact sizes and one probed batch (nothing is written)."""
    quiet, debug, _ = setup(False, debug)

    def body() -> None:
        from ..workflow.plan import plan_files

        plan_files(
            model,
            data,
            tokenizer=tokenizer,
            task=task,
            modules=modules,
            strategy=strategy,
            max_length=max_length,
            batch_size=batch_size,
            queries=queries,
            query_rank=query_rank or None,
            per_token=per_token,
            index_dim=index_dim,
            device=device,
            dtype=dtype,
            memory=memory,
            log=typer.echo,
        )

    run_command(quiet, debug, body)


@app.command()
def score(
    workdir: WorkdirOpt,
    queries: Annotated[Path, typer.Option("--queries", help="JSONL with 'prompt' and 'completion' per line.")],
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Training data to score (default: the data fitted on).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run directory (default: WORKDIR/results/<queries>-vs-<data>-<hash>)."),
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Model directory, for a workdir fitted from Python.")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory (default: as fitted).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Most positive and most negative sequences.")] = 20,
    query_rank: Annotated[
        int, typer.Option("--query-rank", min=0, help="Low-rank query gradients (the paper uses 32); 0 = exact.")
    ] = 32,
    damping: Annotated[
        str | None,
        typer.Option(
            help="Absolute damping >= 0, or 'calibrate' (saved by headwater.training.calibrate_damping); "
            "default: 0.1 x mean eigenvalue per layer."
        ),
    ] = None,
    response: Annotated[
        str, typer.Option(help="influence (the default) or unrolled: the response of --steps steps at --lr.")
    ] = "influence",
    lr: Annotated[float | None, typer.Option(help="Learning rate of the training run (--response unrolled).")] = None,
    steps: Annotated[float | None, typer.Option(help="Training steps (--response unrolled).")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="For --response unrolled.")] = 0.0,
    per_token: Annotated[
        bool, typer.Option("--per-token", help="Save per-token scores for every training sequence ([Q, N, T]).")
    ] = False,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    candidates: Annotated[
        int | None,
        typer.Option("--candidates", min=1, help="Score only each query's top-N BM25 candidates (paper: 10,000)."),
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score queries against the training data; write a run directory with scores, results and report."""
    quiet, debug, log = setup(quiet, debug)

    def body() -> None:
        from ..workflow import score_workdir
        from ..workflow.common import make_response

        run = score_workdir(
            workdir,
            queries,
            data=data,
            out=out,
            model=model,
            tokenizer=tokenizer,
            top_k=top_k,
            query_rank=query_rank or None,
            damping=damping,
            response=make_response(response, lr, steps, weight_decay),
            per_token=per_token,
            batch_size=batch_size,
            device=device,
            progress=not quiet,
            log=log,
            candidates=candidates,
        )
        echo_top(run["results"])

    run_command(quiet, debug, body)


@app.command()
def calibrate(
    workdir: WorkdirOpt,
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Training data (default: the data fitted on).")
    ] = None,
    subsets: Annotated[int, typer.Option(min=3, help="Random half subsets fine-tuned from the final weights.")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="Full-batch Adam steps per subset.")] = 50,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Choose the damping from short fine-tuning runs (a small local LDS); then score with --damping calibrate."""
    quiet, debug, log = setup(quiet, debug)

    def body() -> None:
        from ..workflow.training import calibrate_workdir

        calibrate_workdir(workdir, data=data, device=device, log=log, subsets=subsets, steps=steps)

    run_command(quiet, debug, body)


@app.command()
def source(
    from_training: Annotated[
        Path, typer.Option("--from-training", help="A record written by headwater.integrations.HeadwaterCallback.")
    ],
    data: Annotated[list[Path], typer.Option("--data", "-d", help="Each recorded stage's data, in stage order.")],
    queries: Annotated[Path, typer.Option("--queries", help="JSONL with 'prompt' and 'completion' per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory for scores, results and report.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory of the trained model.")],
    task: Annotated[str, typer.Option(help="causal-lm, seq-cls or seq2seq.")] = "causal-lm",
    modules: Annotated[str, typer.Option(help="As for `headwater fit`.")] = "mlp",
    max_length: Annotated[
        int | None, typer.Option("--max-length", min=2, help="Truncate documents to N tokens.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per batch.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Most positive and most negative sequences.")] = 20,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """SOURCE: attribution through the recorded training run's segments (checkpoints, schedule, optimizer)."""
    quiet, debug, log = setup(quiet, debug)

    def body() -> None:
        from ..workflow.training import source_run

        run = source_run(
            from_training,
            data,
            queries,
            out,
            tokenizer=tokenizer,
            task=task,
            modules=modules,
            max_length=max_length,
            batch_size=batch_size,
            top_k=top_k,
            log=log,
        )
        echo_top(run["results"])

    run_command(quiet, debug, body)


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="A run directory written by `headwater score`, or its workdir.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write (default: RUN/report.html).")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rebuild a run's report.html from its saved, verified files (no model needed)."""
    quiet, debug, log = setup(quiet, debug)

    def body() -> None:
        from ..workflow import write_report

        log(f"wrote {write_report(path, out, log=log)}")

    run_command(quiet, debug, body)


@app.command()
def inspect(
    workdir: Annotated[Path, typer.Argument(help="A workdir made by `headwater fit`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Summarize a workdir: model, layers, strategy, damping, eigenvalue spectra, data, runs, sizes."""
    quiet, debug, _ = setup(True, debug)

    def body() -> None:
        from ..workflow import format_inspect, inspect_workdir

        info = inspect_workdir(workdir)
        typer.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))

    run_command(quiet, debug, body)


@app.command()
def verify(
    workdir: Annotated[Path, typer.Argument(help="A workdir made by `headwater fit`.")],
    debug: DebugOpt = False,
) -> None:
    """Check every artifact against its checksum and settings; say what is stale, missing or corrupt.

    Exits 0 when everything is intact and current, 1 when something is not.
    """
    quiet, debug, _ = setup(True, debug)

    def body() -> int:
        from ..workflow import format_findings, verify_workdir

        findings = verify_workdir(workdir)
        typer.echo(format_findings(findings))
        return sum(f.status != "ok" for f in findings)

    if run_command(quiet, debug, body):
        raise typer.Exit(1)


@app.command()
def analyze(
    path: Annotated[Path, typer.Argument(help="A run directory (or its workdir) holding scores.safetensors.")],
    top_k: Annotated[int, typer.Option("--top-k", help="Top sequences per query for token and overlap analyses.")] = 10,
    blocks: Annotated[int, typer.Option("--blocks", help="Depth blocks for the layer profile.")] = 4,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap draws for the power-law p-value.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full analysis as JSON.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Sparsity, layer profile, token structure and cross-query overlap of a saved run (writes analysis.json)."""
    quiet, debug, log = setup(quiet, debug)

    def body() -> None:
        from ..analysis import summary
        from ..workflow import analyze_run

        res = analyze_run(path, log=log, top_k=top_k, n_blocks=blocks, bootstrap=bootstrap)
        typer.echo(json.dumps(res, indent=2) if as_json else summary(res))

    run_command(quiet, debug, body)


app.add_typer(evaluate_app, name="evaluate", help="Measure attribution quality: LDS, PBRF, planted-fact retrieval.")
app.add_typer(index_app, name="index", help="Build a projected-gradient index once; answer queries from it.")


def main() -> None:  # pragma: no cover - `python -m headwater.cli`
    app()
