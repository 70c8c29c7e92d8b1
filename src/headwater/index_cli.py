"""``headwater index build`` and ``headwater index query``: the projected-gradient index from the shell.

    headwater fit --model runs/gpt2 --data train.jsonl --workdir runs/a
    headwater index build --workdir runs/a --dim 16          # -> runs/a/index/
    headwater index query --workdir runs/a --queries q.jsonl --top-k 20

Both read the workdir's ``cli.json`` exactly as ``headwater score`` does (model, tokenizer,
max_length, modules, strategy, fisher, seed, data path), so the index is built with the same
task and layers as the engine's scores. ``query`` writes ``index_scores.safetensors``,
``index_results.jsonl`` and ``index_report.html`` next to the engine's outputs (never over
them); the report is the engine's report without token heatmaps, since the index stores one
record per sequence, not per token.

Mounted by the main CLI as ``app.add_typer(index_app, name="index")``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli import (
    DebugOpt,
    Log,
    QuietOpt,
    _echo_top,
    _now,
    _read_cli_json,
    _render,
    _run,
    _setup,
    attributor_from_settings,
)
from .io import InputError

__all__ = ["index_app", "build_workdir_index", "query_workdir_index"]

RESULTS_FILE = "index_results.jsonl"
SCORES_FILE = "index_scores.safetensors"
REPORT_FILE = "index_report.html"


def _attributor(workdir: Path, device: str | None, progress: bool) -> tuple[Any, dict, Any]:
    """(Attributor, cli.json settings, tokenizer) rebuilt from a fitted workdir, as ``score`` does."""
    import headwater as hw

    from .io import load_model, load_tokenizer

    settings = _read_cli_json(workdir)
    net = load_model(settings["model"], device=device or settings.get("device", "auto"),
                     dtype=settings.get("dtype", "float32"))  # fmt: skip
    tok = load_tokenizer(settings["tokenizer"])
    task = hw.LanguageModelingTask(tokenizer=tok, max_length=settings.get("max_length"))
    an = attributor_from_settings(settings, net, task, workdir, progress)
    return an, settings, tok


def _data_path(settings: dict, data: str | Path | None) -> Path:
    if data is None:
        data = settings["data"]
        if not Path(data).exists():
            raise InputError(f"the training data {data} recorded at fit time no longer exists; pass --data FILE")
    return Path(data).resolve()


def build_workdir_index(
    workdir: str | Path,
    *,
    data: str | Path | None = None,
    index: str | Path | None = None,
    dim: int | None = None,
    projection: str = "gaussian",
    dtype: str = "float16",
    curvature: str = "auto",
    shard_size: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Log = print,
) -> Any:
    """Build (or resume) the index of a fitted workdir's training data; returns the GradientIndex."""
    from .index import DEFAULT_DIM, DEFAULT_SHARD_SIZE, build_index
    from .io import read_documents

    workdir = Path(workdir)
    an, settings, _ = _attributor(workdir, device, progress)
    data_path = _data_path(settings, data)
    docs = read_documents(data_path)
    path = Path(index) if index is not None else workdir / "index"
    log(f"indexing {len(docs)} documents from {data_path.name} into {path} (dim {dim or DEFAULT_DIM}, {projection})")
    t0 = time.perf_counter()
    idx = build_index(an, docs, dim=dim or DEFAULT_DIM, batch_size=batch_size or settings.get("batch_size", 8),
                      path=path, projection=projection, dtype=dtype, shard_size=shard_size or DEFAULT_SHARD_SIZE,
                      curvature=curvature, overwrite=overwrite)  # fmt: skip
    size = sum(e["bytes"] for e in idx.shards) / 2**20
    kind = idx.manifest["curvature"]["kind"]
    log(f"indexed in {time.perf_counter() - t0:.1f}s: {idx.n_records} records x {idx.record_dim} {idx.dtype}, "
        f"{size:.1f} MiB in {len(idx.shards)} shards, curvature {kind}")  # fmt: skip
    return idx


def query_workdir_index(
    workdir: str | Path,
    queries: str | Path,
    *,
    index: str | Path | None = None,
    data: str | Path | None = None,
    top_k: int = 20,
    damping: float | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    log: Log = print,
) -> list[dict]:
    """Score queries from the index; write index_scores.safetensors, index_results.jsonl, index_report.html."""
    from .data import fingerprint
    from .index import GradientIndex, query_index
    from .io import document_text, read_documents, read_queries
    from .storage import atomic_write_text, save_tensors

    workdir = Path(workdir)
    qs = read_queries(queries)
    an, settings, tok = _attributor(workdir, device, progress)
    path = Path(index) if index is not None else workdir / "index"
    idx = GradientIndex.open(path, verify=True)
    docs = read_documents(_data_path(settings, data))  # for the texts of the top sequences
    fp = fingerprint(docs)
    if fp != idx.manifest["data_fingerprint"]:
        raise InputError(
            f"the index at {path} was built from other data (fingerprint {idx.manifest['data_fingerprint']}, "
            f"this data {fp}); pass the indexed file with --data, or rebuild with `headwater index build`"
        )
    clean_q = [{"prompt": q["prompt"], "completion": q["completion"]} for q in qs]
    k = min(top_k, idx.n_records)
    log(f"querying {len(qs)} queries against {idx.n_records} indexed documents ({path})")
    t0 = time.perf_counter()
    sc = query_index(an, clean_q, idx, top_k=k, batch_size=batch_size or settings.get("batch_size", 8),
                     damping=damping, per_layer=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    top, bottom = sc.top(k), sc.bottom(k)
    layers = [ly.name for ly in idx.layers]

    def entry(q: int, i: int, score: float) -> dict:
        per_layer = {n: float(sc.per_layer[n][q, i]) for n in layers}
        return {"index": i, "score": score, "text": document_text(docs[i], tok), "per_layer": per_layer}

    results = []
    for q, query in enumerate(qs):
        res = {"query": q, **query}
        res["top"] = [entry(q, i, float(v)) for i, v in zip(top.indices[q].tolist(), top.values[q].tolist())]
        res["bottom"] = [entry(q, i, float(v)) for i, v in zip(bottom.indices[q].tolist(), bottom.values[q].tolist())]
        res["per_layer_top"] = {n: sum(e["per_layer"][n] for e in res["top"]) for n in layers}
        res["per_layer_bottom"] = {n: sum(e["per_layer"][n] for e in res["bottom"]) for n in layers}
        row = sc.values[q]
        res["stats"] = {"n": int(row.numel()), "positive": int((row > 0).sum()), "mean": float(row.mean()),
                        "std": float(row.std()) if row.numel() > 1 else 0.0, "max": float(row.max()),
                        "min": float(row.min())}  # fmt: skip
        if query.get("relevant") is not None:
            rel = set(query["relevant"])
            res["recall"] = len(rel & set(top.indices[q].tolist())) / len(rel) if rel else None
            res["recall_k"] = k
        results.append(res)
    proj = idx.manifest["projection"]
    meta = {
        "title": f"headwater index report: {workdir.name}",
        "created": _now(),
        "queries_file": str(Path(queries).resolve()),
        "index": str(path.resolve()),
        "data_fingerprint": fp,
        "n_train": idx.n_records,
        "n_queries": len(qs),
        "top_k": k,
        "damping": sc.meta["damping"],
        "damping_arg": damping,
        "layers": layers,
        "strategy": f"index ({proj['kind']} projection, dim {proj['dim']}, {sc.meta['curvature']} curvature)",
        "score_seconds": round(seconds, 2),
    }
    target = Path(out) if out is not None else workdir
    # the report's "Strategy" row reads the settings: say that these scores come from the index
    html = _render(results, sc, {**settings, "strategy": meta["strategy"]}, meta)
    save_tensors(target / SCORES_FILE, sc.tensors(), meta)
    atomic_write_text(target / RESULTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    atomic_write_text(target / REPORT_FILE, html)
    log(f"queried in {seconds:.2f}s -> {target / SCORES_FILE}, {target / RESULTS_FILE}, {target / REPORT_FILE}")
    return results


# ---------------------------------------------------------------------------------------
# Typer commands
# ---------------------------------------------------------------------------------------

index_app = typer.Typer(
    name="index",
    help="A persistent projected-gradient index: build once, then query in milliseconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-w", help="A workdir made by `headwater fit`.")]
IndexOpt = Annotated[Path | None, typer.Option("--index", help="Index directory (default: WORKDIR/index).")]
DataOpt = Annotated[
    Path | None, typer.Option("--data", "-d", help="Training data to index (default: the data fitted on).")
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, ... (default: as fitted).")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="Sequences per batch (default: as fitted).")]


@index_app.command()
def build(
    workdir: WorkdirOpt,
    data: DataOpt = None,
    index: IndexOpt = None,
    dim: Annotated[
        int | None, typer.Option(min=1, help="Projection size per side and layer: k = min(dim, layer width); 16.")
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
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build (or resume) the index: one projected gradient per training document, plus its curvature."""
    quiet, debug, log = _setup(quiet, debug)
    _run(quiet, debug, lambda: build_workdir_index(
        workdir, data=data, index=index, dim=dim, projection=projection, dtype=dtype, curvature=curvature,
        shard_size=shard_size, batch_size=batch_size, device=device, overwrite=overwrite, progress=not quiet, log=log,
    ))  # fmt: skip


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
        float | None, typer.Option(min=0.0, help="Absolute damping (default: 0.1 x mean projected eigenvalue).")
    ] = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (default: WORKDIR).")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score queries from the index; write index_scores.safetensors, index_results.jsonl, index_report.html."""
    quiet, debug, log = _setup(quiet, debug)

    def body() -> None:
        results = query_workdir_index(
            workdir, queries, index=index, data=data, top_k=top_k, damping=damping, batch_size=batch_size,
            device=device, out=out, progress=not quiet, log=log,
        )  # fmt: skip
        _echo_top(results)

    _run(quiet, debug, body)
