"""``headwater index build`` and ``headwater index query``: the projected-gradient index of a workdir.

Both reopen the workdir exactly as ``score`` does (model, tokenizer, max_length, modules,
strategy, fisher, seed, data path), so the index uses the same task and layers as the engine.
``build`` also measures how well the index agrees with the engine's own scores on a small
sample (top-10 overlap and Spearman correlation, self-queries from the training data), prints
it and stores it in the manifest: an index trades accuracy for speed, and the user should see
by how much. ``query`` writes a run directory like ``score`` (without token heatmaps: the
index keeps one record per sequence, not per token).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..io import InputError, check_relevant
from ..storage import load_json, save_json
from .common import Log, check_queries_fit, now, reopen
from .score import build_results, run_dir_for, write_run

__all__ = ["build_workdir_index", "query_workdir_index", "index_agreement"]


def _data_path(settings: dict, data: str | Path | None) -> Path:
    if data is None:
        data = settings.get("data")
        if data is None:
            raise InputError("this workdir was fitted from Python and records no data file; pass --data FILE")
        if not Path(data).exists():
            raise InputError(f"the training data {data} recorded at fit time no longer exists; pass --data FILE")
    return Path(data).resolve()


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    c = np.corrcoef(rx, ry)[0, 1]
    return float(c) if np.isfinite(c) else 0.0


def index_agreement(an: Any, docs: Any, index: Any, queries: int = 4, pool: int = 256, batch_size: int = 8) -> dict:
    """Agreement of the index with the engine's scores: self-queries from the data against a sample of it.

    ``queries`` training documents (their own loss as the measurement) are scored against ``pool``
    evenly spaced documents by the engine (the workdir's strategy, full rank) and by the index;
    returns the mean top-10 overlap (of 10) and the mean Spearman correlation over the queries.
    """
    from ..data import Subset
    from ..index import query_index

    n = len(docs)
    cols = np.unique(np.linspace(0, n - 1, min(pool, n)).round().astype(int))
    qs = Subset(docs, np.unique(np.linspace(0, n - 1, min(queries, n)).round().astype(int)))
    exact = an.scores(qs, Subset(docs, cols), batch_size=batch_size, cache=False).values.double().numpy()
    approx = query_index(an, qs, index, batch_size=batch_size).values.double().numpy()[:, cols]
    k = min(10, len(cols))
    overlap = [len(set(np.argsort(-e)[:k]) & set(np.argsort(-a)[:k])) for e, a in zip(exact, approx)]
    return {
        "top10_overlap": float(np.mean(overlap)),
        "k": k,
        "spearman": float(np.mean([_spearman(e, a) for e, a in zip(exact, approx)])),
        "queries": int(len(qs)),
        "pool": int(len(cols)),
    }


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
    agreement: bool = True,
    progress: bool = True,
    log: Log = print,
) -> Any:
    """Build (or resume) the index of a fitted workdir's training data; returns the GradientIndex."""
    from ..index import DEFAULT_DIM, DEFAULT_SHARD_SIZE, MANIFEST, GradientIndex, build_index
    from ..io import read_documents

    workdir = Path(workdir)
    r = reopen(workdir, device=device, progress=progress)
    an, settings = r.attributor, r.settings
    data_path = _data_path(settings, data)
    docs = read_documents(data_path)
    path = Path(index) if index is not None else workdir / "index"
    bs = batch_size or settings.get("batch_size", 8)
    log(f"indexing {len(docs)} documents from {data_path.name} into {path} (dim {dim or DEFAULT_DIM}, {projection})")
    t0 = time.perf_counter()
    idx = build_index(
        an,
        docs,
        dim=dim or DEFAULT_DIM,
        batch_size=bs,
        path=path,
        projection=projection,
        dtype=dtype,
        shard_size=shard_size or DEFAULT_SHARD_SIZE,
        curvature=curvature,
        overwrite=overwrite,
    )
    size = sum(e["bytes"] for e in idx.shards) / 2**20
    log(
        f"indexed in {time.perf_counter() - t0:.1f}s: {idx.n_records} records x {idx.record_dim} {idx.dtype}, "
        f"{size:.1f} MiB in {len(idx.shards)} shards, curvature {idx.manifest['curvature']['kind']}"
    )
    if agreement and an.curvature is not None and idx.manifest.get("agreement") is None:
        t1 = time.perf_counter()
        agree = index_agreement(an, docs, idx, batch_size=bs)
        manifest = load_json(path / MANIFEST)
        save_json(path / MANIFEST, {**manifest, "agreement": agree})
        idx = GradientIndex.open(path)
        log(
            f"agreement with the engine's {an.strategy} scores ({agree['queries']} self-queries x {agree['pool']} "
            f"documents, {time.perf_counter() - t1:.1f}s): top-{agree['k']} overlap {agree['top10_overlap']:.1f}/"
            f"{agree['k']}, Spearman {agree['spearman']:.2f}; the index's scores are on their own scale. Use a larger "
            "--dim for closer agreement, `headwater score` for exact scores"
        )
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
) -> dict:
    """Score queries from the index; write a run directory (scores.safetensors, results.jsonl, report.html)."""
    from ..data import fingerprint
    from ..index import GradientIndex, query_index
    from ..io import document_text, read_documents, read_queries
    from .common import RESULTS_FILE
    from .outputs import render

    workdir = Path(workdir)
    qpath = Path(queries).resolve()
    qs = read_queries(qpath)
    r = reopen(workdir, device=device, progress=progress)
    an, settings, tok = r.attributor, r.settings, r.tokenizer
    path = Path(index) if index is not None else workdir / "index"
    idx = GradientIndex.open(path, verify=True)
    data_path = _data_path(settings, data)
    docs = read_documents(data_path)  # for the texts of the top sequences
    fp = fingerprint(docs)
    if fp != idx.manifest["data_fingerprint"]:
        raise InputError(
            f"the index at {path} was built from other data (fingerprint {idx.manifest['data_fingerprint']}, "
            f"this data {fp}); pass the indexed file with --data, or rebuild with `headwater index build`"
        )
    check_relevant(qs, len(docs), data_path.name)
    check_queries_fit(r.task, qs, qpath, log)
    clean_q = [{"prompt": q["prompt"], "completion": q["completion"]} for q in qs]
    k = min(top_k, idx.n_records)
    log(f"querying {len(qs)} queries against {idx.n_records} indexed documents ({path})")
    t0 = time.perf_counter()
    sc = query_index(
        an,
        clean_q,
        idx,
        top_k=k,
        batch_size=batch_size or settings.get("batch_size", 8),
        damping=damping,
        per_layer=True,
    )
    seconds = time.perf_counter() - t0
    layers = [ly.name for ly in idx.layers]

    def entry(q: int, i: int, score: float) -> dict:
        per_layer = {n: float(sc.per_layer[n][q, i]) for n in layers}
        return {"index": i, "score": score, "text": document_text(docs[i], tok), "per_layer": per_layer}

    results = build_results(qs, sc, k, layers, entry)
    proj = idx.manifest["projection"]
    spec = {"index": idx.manifest.get("checksum"), "queries": fingerprint(clean_q), "top_k": k, "damping": damping}
    target = Path(out) if out is not None else run_dir_for(workdir, qpath, data_path, {"index": spec})
    run = {
        "title": f"headwater index report: {workdir.name}",
        "created": now(),
        "workdir": str(workdir.resolve()),
        "factors": an.factors_checksum,
        "queries_file": str(qpath),
        "index": str(path.resolve()),
        "data": str(data_path),
        "data_fingerprint": fp,
        "n_train": idx.n_records,
        "n_queries": len(qs),
        "top_k": k,
        "damping": sc.meta["damping"],
        "damping_arg": damping,
        "layers": layers,
        "strategy": f"index ({proj['kind']} projection, dim {proj['dim']}, {sc.meta['curvature']} curvature)",
        "agreement": idx.manifest.get("agreement"),
        "score_seconds": round(seconds, 2),
    }
    # the report's "Strategy" row reads the settings: say that these scores come from the index
    run["settings_override"] = {"strategy": run["strategy"]}
    html = render(results, sc, {**settings, "strategy": run["strategy"]}, run, source=str(target / RESULTS_FILE))
    write_run(target, sc, results, run, html)
    log(f"queried in {seconds:.2f}s -> {target}/")
    return {"results": results, "out": target, "scores": sc, "run": run}
