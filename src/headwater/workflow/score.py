"""``headwater score``: queries against the training data; a run directory of scores, results and a report.

A run directory (default ``WORKDIR/results/<queries>-vs-<data>-<settings hash>``, or ``--out``)::

    scores.safetensors   [Q, N] scores and per-layer scores (checksummed)
    results.jsonl        per query: top-k and bottom-k sequences with text, tokens, token scores
    report.html          the report
    run.json             what the run depended on: workdir, factors checksum, files and their
                         fingerprints, options, and the checksum of results.jsonl

Runs with other queries, data or options get other directories, so they never overwrite each
other; a refit removes them all (they derive from the old factors).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from ..errors import ExampleError
from ..io import InputError, check_relevant
from ..storage import atomic_write_text, json_checksum, save_json, save_tensors
from .common import (
    ANALYSIS_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    RUN_FILE,
    RUNS,
    SCORES_FILE,
    Log,
    at_location,
    calibration_summary,
    check_damping,
    check_fit_data,
    check_queries_fit,
    located_warnings,
    now,
    recorded_data,
    reopen,
)

__all__ = ["score_workdir", "build_results", "write_run", "run_dir_for", "RUN_FILE", "RESULTS_FILE", "SCORES_FILE"]


def run_dir_for(workdir: Path, queries: Path, data: Path, spec: dict) -> Path:
    """``WORKDIR/results/<queries stem>-vs-<data stem>-<hash of the options>``."""
    from ..engine import spec_key

    def stem(p: Path) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", p.stem)[:40] or "data"

    return workdir / RUNS / f"{stem(queries)}-vs-{stem(data)}-{spec_key(spec)[:8]}"


def token_pieces(tok: Any, ids: list[int]) -> list[str]:
    """Each token's text, so the pieces concatenate to (about) the decoded sequence.

    Byte-level BPE decodes single tokens exactly; SentencePiece drops a piece's leading
    space when decoded alone, so it is put back from the '▁' marker.
    """
    raw = tok.convert_ids_to_tokens(ids)
    out = []
    for i, r in zip(ids, raw):
        piece = tok.decode([i])
        if isinstance(r, str) and r.startswith("\u2581") and not piece.startswith(" "):
            piece = " " + piece
        out.append(piece)
    return out


def _shown_token_scores(
    an: Any,
    sc: Any,
    queries: list[dict],
    docs: Any,
    shown: list[list[int]],
    tokens_of: dict,
    per_token: bool,
    options: dict,
    progress: bool,
) -> list[dict]:
    """Per-token scores of the sequences the report shows, [Q] -> {index: [per position]}.

    Unless ``per_token`` scored all of them, each query's shown sequences are re-scored with
    per-token resolution: the same computation restricted to those columns, so exact and far
    cheaper than [Q, N, T]; ``cache=False`` keeps these small runs out of the workdir's cache.
    ``options``: the main run's ``batch_size``, ``damping``, ``query_rank`` and ``response``.
    """
    if per_token:
        return [{i: sc.per_token[q, i, : len(tokens_of[i])].tolist() for i in idxs} for q, idxs in enumerate(shown)]
    # Queries in groups whose shown sequences are scored together: each group's query gradients
    # (the costly part for a large model: the preconditioning) are computed once, and a group's
    # [Q, U, T] per-token block stays under about 256 MiB.
    longest = max((len(t) for t in tokens_of.values()), default=1)
    groups, current, union = [], [], set()
    for q in range(len(queries)):
        grown = union | set(shown[q])
        if current and 4 * (len(current) + 1) * len(grown) * longest > 2**28:
            groups.append((current, sorted(union)))
            current, grown = [], set(shown[q])
        current, union = current + [q], grown
    groups.append((current, sorted(union)))
    out: list[dict] = [{} for _ in queries]
    it: Any = groups
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="per-token scores", unit="group", leave=False, dynamic_ncols=True)
    # the main pass has already warned about every truncated example, by its line; here the
    # rows are renumbered, so the engine's repeats would name the wrong examples
    with located_warnings({"training data": None, "queries": None}):
        for qs, cols in it:
            st = an.scores(
                [queries[q] for q in qs],
                [docs[i] for i in cols],
                per_token=True,
                cache=False,
                **options,
            )
            where = {i: j for j, i in enumerate(cols)}
            for row, q in enumerate(qs):
                out[q] = {i: st.per_token[row, where[i], : len(tokens_of[i])].tolist() for i in shown[q]}
    return out


def _stats(row: Any) -> dict:
    return {
        "n": int(row.numel()),
        "positive": int((row > 0).sum()),
        "mean": float(row.mean()),
        "std": float(row.std()) if row.numel() > 1 else 0.0,
        "max": float(row.max()),
        "min": float(row.min()),
    }


def build_results(queries: list[dict], sc: Any, k: int, layers: list[str], entry: Any) -> list[dict]:
    """One results.jsonl row per query: top/bottom entries, per-layer sums, statistics, recall@k.

    ``entry(q, i, score)`` builds one sequence's entry. Only scored pairs are ranked and counted
    (with candidates, each query's own candidates).
    """
    top, bottom = sc.top(k), sc.bottom(k)
    results = []
    for q, query in enumerate(queries):
        res = {**query, "query": q}
        res["top"] = [entry(q, i, float(v)) for i, v in zip(top.indices[q].tolist(), top.values[q].tolist())]
        res["bottom"] = [entry(q, i, float(v)) for i, v in zip(bottom.indices[q].tolist(), bottom.values[q].tolist())]
        res["per_layer_top"] = {n: sum(e["per_layer"][n] for e in res["top"]) for n in layers}
        res["per_layer_bottom"] = {n: sum(e["per_layer"][n] for e in res["bottom"]) for n in layers}
        res["stats"] = _stats(sc.values[q] if sc.mask is None else sc.values[q][sc.mask[q]])
        if query.get("relevant") is not None:
            rel = set(query["relevant"])
            res["recall"] = len(rel & set(top.indices[q].tolist())) / len(rel) if rel else None
            res["recall_k"] = int(top.indices.shape[1])
        results.append(res)
    return results


def write_run(out: Path, sc: Any, results: list[dict], run: dict, html: str) -> None:
    """Write a run's four files; each is complete in memory before the first rename.

    run.json, written last, records the checksums of results.jsonl and report.html (the
    other files carry their own). An analysis.json of an earlier run in the same directory
    (``--out`` reused) is removed first: it describes scores that are about to be replaced.
    """
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in results)
    run = {**run, "results_checksum": json_checksum(text), "report_checksum": json_checksum(html)}
    (out / ANALYSIS_FILE).unlink(missing_ok=True)
    meta = {k: v for k, v in run.items() if k not in ("results_checksum", "report_checksum")}
    save_tensors(out / SCORES_FILE, sc.tensors(), meta)
    atomic_write_text(out / RESULTS_FILE, text)
    atomic_write_text(out / REPORT_FILE, html)
    save_json(out / RUN_FILE, run)


def _training_data(an: Any, settings: dict, data: Any, workdir: Path, kind: str) -> tuple[Path, list]:
    """The data to score: ``--data``, or the file recorded at fit time (checked unchanged)."""
    from ..io import read_documents

    data_path = recorded_data(settings, data, workdir)
    docs = read_documents(data_path, kind)
    if data is None:
        check_fit_data(an, docs, data_path, workdir)
    return data_path, docs


def _results_rows(
    r: Any, sc: Any, qs: list, clean_q: list, docs: list, k: int, per_token: bool, options: dict, progress: bool
) -> list[dict]:
    """results.jsonl's rows: each query's top and bottom ``k`` with text, token heatmap and layers."""
    from ..io import document_text

    an, tok, kind = r.attributor, r.tokenizer, r.settings.get("task", "causal-lm")
    top, bottom = sc.top(k), sc.bottom(k)
    shown = [list(dict.fromkeys(top.indices[q].tolist() + bottom.indices[q].tolist())) for q in range(len(qs))]
    if kind == "causal-lm":  # token heatmaps: a causal LM's per-token scores follow its one token axis
        with located_warnings({"": None}):  # the main pass has said which of them are truncated
            tokens_of = {i: r.task.collate([docs[i]])["input_ids"][0].tolist() for i in {i for s in shown for i in s}}
        token_scores = _shown_token_scores(an, sc, clean_q, docs, shown, tokens_of, per_token, options, progress)
    else:
        tokens_of, token_scores = {i: [] for s in shown for i in s}, [dict.fromkeys(s, [0.0]) for s in shown]
    pieces = {i: token_pieces(tok, ids) for i, ids in tokens_of.items()}
    layers = list(an.layers)

    def entry(q: int, i: int, score: float) -> dict:
        raw = token_scores[q][i]
        # The value at position t comes from the gradient there, which carries the loss of
        # predicting token t+1; show it on that token (the last position predicts nothing).
        return {
            "index": i,
            "score": score,
            "text": document_text(docs[i], tok),
            "tokens": pieces[i],
            "token_scores": ([0.0] + raw[:-1])[: len(pieces[i])],
            "per_layer": {n: float(sc.per_layer[n][q, i]) for n in layers},
        }

    return build_results(qs, sc, k, layers, entry)


def score_workdir(
    workdir: str | Path,
    queries: str | Path,
    *,
    data: str | Path | None = None,
    out: str | Path | None = None,
    model: str | Path | None = None,
    tokenizer: str | Path | None = None,
    top_k: int = 20,
    query_rank: int | None = 32,
    damping: float | None = None,
    per_token: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    candidates: int | None = None,
    response: Any = None,
    progress: bool = True,
    log: Log = print,
    title: str | None = None,
) -> dict:
    """Score queries against the training data; write a run directory. Returns {"results", "out", ...}.

    Long because it is the score command's steps in order, on one page: validate every input,
    key the run, score, build the rows, write the run directory.
    """
    from ..data import fingerprint
    from ..io import query_example, read_queries
    from ..plan import human, score_sizes
    from .outputs import render

    workdir = Path(workdir)
    damping = check_damping(damping)
    qpath = Path(queries).resolve()
    r = reopen(workdir, device=device, model=model, tokenizer=tokenizer, progress=progress)
    an, settings = r.attributor, r.settings
    kind = settings.get("task", "causal-lm")
    qs = read_queries(qpath, kind)
    if an.strategy != "identity" and an.curvature is None:
        raise InputError(f"workdir {workdir} has no fitted factors (factors.safetensors); run `headwater fit` first")
    data_path, docs = _training_data(an, settings, data, workdir, kind)
    data_fp = fingerprint(docs)
    check_relevant(qs, len(docs), data_path.name)
    check_queries_fit(r.task, qs, qpath, log, kind)
    bs = batch_size or settings.get("batch_size", 8)
    rank = query_rank or None
    clean_q = [query_example(q, kind) for q in qs]
    k = min(top_k, len(docs) if candidates is None else min(candidates, len(docs)))
    spec = {
        "queries": fingerprint(clean_q),
        "data": data_fp,
        "top_k": k,
        "query_rank": rank,
        "damping": damping,
        "response": response.spec() if response is not None else None,
        "per_token": per_token,
        "candidates": candidates,
        "factors": an.factors_checksum,
    }
    target = Path(out) if out is not None else run_dir_for(workdir, qpath, data_path, spec)
    against = (
        f"{len(docs)} training documents"
        if candidates is None
        else (f"each one's top {min(candidates, len(docs))} BM25 candidates among {len(docs)} training documents")
    )
    log(f"scoring {len(qs)} queries against {against} (query rank {rank or 'full'})")
    qgrads, out_bytes = score_sizes(list(an.shapes.values()), len(qs), len(docs), rank)
    log(f"  query gradients {human(qgrads)}, scores {human(out_bytes)} in memory and on disk")
    t0 = time.perf_counter()
    options = dict(batch_size=bs, damping=damping, query_rank=rank, response=response)
    try:
        with located_warnings({"training data": (docs, data_path), "queries": None}):
            sc = an.scores(clean_q, docs, per_layer=True, per_token=per_token, candidates=candidates, **options)
    except ExampleError as e:
        raise at_location(e, docs, data_path) from e
    if sc.meta.get("cached"):
        log(f"reusing the cached scores of an identical earlier run ({sc.meta.get('run', {}).get('id')})")
    results = _results_rows(r, sc, qs, clean_q, docs, k, per_token, options, progress)
    seconds = time.perf_counter() - t0
    run = {
        "title": title or f"headwater report: {workdir.name}",
        "created": now(),
        "workdir": str(workdir.resolve()),
        "factors": an.factors_checksum,
        "queries_file": str(qpath),
        "data": str(data_path),
        "data_fingerprint": data_fp,
        "n_train": len(docs),
        "n_queries": len(qs),
        "top_k": k,
        "query_rank": rank,
        "candidates": candidates,
        "damping": sc.meta.get("damping"),
        "damping_arg": damping,
        "calibration": calibration_summary(workdir) if damping == "calibrate" else None,
        "per_token": per_token,
        "layers": list(an.layers),
        "strategy": settings.get("strategy"),
        # what the factors were fitted with (cli.json): the report shows it even after a refit
        "fit": {k: v for k, v in settings.items() if k != "checksum"},
        "cached": bool(sc.meta.get("cached")),
        "score_seconds": round(seconds, 2),
        "spec": spec,
    }
    write_run(target, sc, results, run, render(results, sc, settings, run, source=str(target / RESULTS_FILE)))
    log(f"scored in {seconds:.1f}s -> {target}/ ({SCORES_FILE}, {RESULTS_FILE}, {REPORT_FILE})")
    return {"results": results, "out": target, "scores": sc, "run": run}
