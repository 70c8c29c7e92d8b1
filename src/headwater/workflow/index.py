"""``headwater index build`` and ``headwater index query``: the projected-gradient index of a workdir.

Both reopen the workdir exactly as ``score`` does (model, tokenizer, max_length, modules,
strategy, fisher, seed, data path), so the index uses the same task and layers as the engine.
``build`` also measures how well the index agrees with the engine's own scores on a small
sample (top-10 overlap and Spearman correlation, self-queries from the training data), prints
it and stores it in the manifest: an index trades accuracy for speed, and the user should see
by how much. ``query`` writes a run directory like ``score`` (without token heatmaps: the
index keeps one record per sequence, not per token).

Provenance. The index's own manifest identifies the model and the data, not the tokenization
or the factors its "engine" curvature and "kfac" projections come from, so a refit (say with
another ``--max-length``) would leave an index at a path outside the workdir looking current.
``build`` therefore writes ``source.json`` next to the manifest (the factors' checksum and the
model's and task's fingerprints) before it writes any record; ``build`` on a stale index needs
``--overwrite``, and ``query`` refuses one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..io import InputError, check_relevant
from ..storage import CorruptArtifactError, load_json, save_json
from .common import (
    Log,
    check_damping,
    check_fit_data,
    check_queries_fit,
    located_warnings,
    now,
    recorded_data,
    reopen,
    tidy,
)
from .score import build_results, run_dir_for, write_run

__all__ = ["build_workdir_index", "query_workdir_index", "index_agreement", "index_source", "SOURCE_FILE"]

SOURCE_FILE = "source.json"
# What build_index writes into an index directory (and all that --overwrite removes there).
_INDEX_FILES = ("manifest.json", SOURCE_FILE, "projections.safetensors", "curvature.safetensors")


def index_source(an: Any) -> dict:
    """What an index built from this Attributor depends on beyond its manifest (see the module docstring)."""
    return {
        "factors": an.factors_checksum,
        "model": an.config["model"]["fingerprint"],
        "task": an.config["task"]["fingerprint"],
    }


def _stale(saved: dict, current: dict) -> str | None:
    """Why an index with ``saved`` provenance does not belong to ``current``, or None."""
    if saved.get("model") != current["model"]:
        return "for another model"
    if saved.get("task") != current["task"]:
        return "with another tokenizer or max length"
    if saved.get("factors") != current["factors"]:
        return "from factors the workdir no longer holds (it was refitted since)"
    return None


def _read_source(path: Path) -> dict | None:
    """The index's source.json (None for an index built from Python or before it existed)."""
    if not (path / SOURCE_FILE).exists():
        return None
    return load_json(path / SOURCE_FILE, hint="rebuild the index with `headwater index build --overwrite`")


def _problem(path: Path, current: dict) -> str | None:
    """What keeps ``build_index`` from resuming the index at ``path``: stale, or a damaged manifest,
    provenance or projections (damaged shards and curvature it rewrites by itself). None if nothing."""
    import hashlib

    from ..index import MANIFEST

    if not (path / MANIFEST).exists():
        return None
    try:
        manifest = load_json(path / MANIFEST)
        source = _read_source(path)
    except CorruptArtifactError as e:
        return str(e).split(";")[0]
    why = _stale(source, current) if source is not None else None
    if why:
        return f"the index at {path} was built {why}"
    proj = manifest.get("projection") or {}
    file = path / str(proj.get("file"))
    if not file.is_file() or file.stat().st_size != proj.get("bytes"):
        return f"index file {file} is missing or truncated"
    if hashlib.sha256(file.read_bytes()).hexdigest() != proj.get("sha256"):
        return f"index file {file} does not match its sha256 checksum in the manifest"
    return None


def _remove_index(path: Path) -> None:
    """Remove what build_index wrote in ``path`` (nothing else: it may be a user's directory)."""
    for name in _INDEX_FILES:
        (path / name).unlink(missing_ok=True)
    for f in (*path.glob("shard-*.bin"), *path.glob("shard-*.entry.json")):
        f.unlink(missing_ok=True)


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
    data_path = recorded_data(settings, data, workdir)
    docs = read_documents(data_path, settings.get("task", "causal-lm"))
    if data is None:
        check_fit_data(an, docs, data_path, workdir)
    path = Path(index) if index is not None else workdir / "index"
    tidy(path)
    source = index_source(an)
    problem = _problem(path, source)
    if problem is not None:
        if not overwrite:
            raise InputError(f"{problem}; pass --overwrite to rebuild it")
        _remove_index(path)
    elif overwrite and (path / MANIFEST).exists() and _read_source(path) is None:
        _remove_index(path)  # built elsewhere (Python, an older version): its provenance is unknown
    known = not (path / MANIFEST).exists() or _read_source(path) is not None
    if known:  # before any record: an interrupted build then resumes only from the same source
        path.mkdir(parents=True, exist_ok=True)
        save_json(path / SOURCE_FILE, source)
    bs = batch_size or settings.get("batch_size", 8)
    log(f"indexing {len(docs)} documents from {data_path.name} into {path} (dim {dim or DEFAULT_DIM}, {projection})")
    t0 = time.perf_counter()
    with located_warnings({"training data": (docs, data_path)}):
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
        with located_warnings({"training data": None, "queries": None}):  # said once above
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
    """Score queries from the index; write a run directory (scores.safetensors, results.jsonl, report.html).

    Long because it is the ``index query`` command's steps in order, on one page: validate the
    inputs and the index's freshness, score, build the rows, write the run directory.
    """
    from ..data import fingerprint
    from ..index import GradientIndex, query_index
    from ..io import document_text, query_example, read_documents, read_queries
    from .common import RESULTS_FILE
    from .outputs import render

    workdir = Path(workdir)
    damping = check_damping(damping)
    qpath = Path(queries).resolve()
    r = reopen(workdir, device=device, progress=progress)
    an, settings, tok = r.attributor, r.settings, r.tokenizer
    kind = settings.get("task", "causal-lm")
    qs = read_queries(qpath, kind)
    path = Path(index) if index is not None else workdir / "index"
    tidy(path)
    idx = GradientIndex.open(path, verify=True)
    source = _read_source(path)
    why = _stale(source, index_source(an)) if source is not None else None
    if why:
        raise InputError(
            f"the index at {path} was built {why}; rebuild it with "
            f"`headwater index build --workdir {workdir} --overwrite`"
        )
    data_path = recorded_data(settings, data, workdir)
    docs = read_documents(data_path, kind)  # for the texts of the top sequences
    fp = fingerprint(docs)
    if fp != idx.manifest["data_fingerprint"]:
        raise InputError(
            f"the index at {path} was built from other data (fingerprint {idx.manifest['data_fingerprint']}, "
            f"this data {fp}); pass the indexed file with --data, or rebuild with `headwater index build`"
        )
    check_relevant(qs, len(docs), data_path.name)
    check_queries_fit(r.task, qs, qpath, log, kind)
    clean_q = [query_example(q, kind) for q in qs]
    k = min(top_k, idx.n_records)
    log(f"querying {len(qs)} queries against {idx.n_records} indexed documents ({path})")
    t0 = time.perf_counter()
    with located_warnings({"queries": None}):  # check_queries_fit has said it, with the line
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
        "fit": {k: v for k, v in settings.items() if k != "checksum"},
        "cached": False,
        "score_seconds": round(seconds, 2),
    }
    # the report's "Strategy" row reads the settings: say that these scores come from the index
    run["settings_override"] = {"strategy": run["strategy"]}
    html = render(results, sc, {**settings, "strategy": run["strategy"]}, run, source=str(target / RESULTS_FILE))
    write_run(target, sc, results, run, html)
    log(f"queried in {seconds:.2f}s -> {target}/")
    return {"results": results, "out": target, "scores": sc, "run": run}
