"""``headwater index build`` and ``headwater index query``: the projected-gradient index from the shell.

    headwater fit --model runs/gpt2 --data train.jsonl --workdir runs/a
    headwater index build --workdir runs/a --dim 32          # -> runs/a/index/
    headwater index query --workdir runs/a --queries q.jsonl --top-k 20   # -> a run directory

See ``headwater.workflow.index``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import BatchOpt, DebugOpt, DeviceOpt, QuietOpt, WorkdirOpt, echo_top, new_app, run_command, setup

__all__ = ["index_app"]

index_app = new_app("index", "A persistent projected-gradient index: build once, then query in milliseconds.")

IndexOpt = Annotated[Path | None, typer.Option("--index", help="Index directory (default: WORKDIR/index).")]
DataOpt = Annotated[
    Path | None, typer.Option("--data", "-d", help="Training data to index (default: the data fitted on).")
]


@index_app.command()
def build(
    workdir: WorkdirOpt,
    data: DataOpt = None,
    index: IndexOpt = None,
    dim: Annotated[
        int | None, typer.Option(min=1, help="Projection size per side and layer: k = min(dim, layer width).")
    ] = None,
    projection: Annotated[
        str, typer.Option(help="gaussian, rademacher, orthogonal or kfac (needs factors).")
    ] = "gaussian",
    dtype: Annotated[str, typer.Option(help="Record precision: float16, bfloat16 or float32.")] = "float16",
    curvature: Annotated[
        str,
        typer.Option(
            help="auto (engine = fitted curvature projected; ekfac above dim 64), engine, ekfac, kfac, dense, identity."
        ),
    ] = "auto",
    shard_size: Annotated[int | None, typer.Option("--shard-size", min=1, help="Records per shard file.")] = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an index built with other settings or data.")] = False,
    agreement: Annotated[
        bool, typer.Option(help="Measure the agreement with the engine's scores on a small sample.")
    ] = True,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build (or resume) the index: one projected gradient per training document, plus its curvature."""
    quiet, debug, log = setup(quiet, debug)

    def body() -> None:
        from ..workflow import build_workdir_index

        build_workdir_index(
            workdir,
            data=data,
            index=index,
            dim=dim,
            projection=projection,
            dtype=dtype,
            curvature=curvature,
            shard_size=shard_size,
            batch_size=batch_size,
            device=device,
            overwrite=overwrite,
            agreement=agreement,
            progress=not quiet,
            log=log,
        )

    run_command(quiet, debug, body)


@index_app.command()
def query(
    workdir: WorkdirOpt,
    queries: Annotated[Path, typer.Option("--queries", help="JSONL with 'prompt' and 'completion' per line.")],
    index: IndexOpt = None,
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="The indexed data, for texts (default: the data fitted on).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Most positive and most negative documents.")] = 20,
    damping: Annotated[
        float | None, typer.Option(help="Absolute damping, >= 0 (default: 0.1 x mean projected eigenvalue).")
    ] = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: WORKDIR/results/<queries>-vs-...).")
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score queries from the index; write a run directory (scores, results, report)."""
    quiet, debug, log = setup(quiet, debug)

    def body() -> None:
        from ..workflow import query_workdir_index

        run = query_workdir_index(
            workdir,
            queries,
            index=index,
            data=data,
            top_k=top_k,
            damping=damping,
            batch_size=batch_size,
            device=device,
            out=out,
            progress=not quiet,
            log=log,
        )
        echo_top(run["results"])

    run_command(quiet, debug, body)
