"""The ``headwater`` command: from a local model and a data file to a report, without Python.

    headwater demo --out headwater-demo
    headwater fit --model runs/gpt2 --data train.jsonl --workdir runs/a
    headwater score --workdir runs/a --queries queries.jsonl
    headwater report runs/a          # rebuild runs/a/report.html from the saved results
    headwater inspect runs/a         # what is in the workdir

A workdir holds the engine's artifacts (config.json, covariance/factors.safetensors) plus
``cli.json``, which records what ``score`` needs to reload (model, tokenizer and data paths,
max_length). ``score`` writes scores.safetensors, results.jsonl and report.html.

Errors print one line to stderr and exit with status 2 (``--debug`` shows the traceback).
Every file is written to a temporary name and renamed, so an interrupted command leaves no
half-written file. Nothing touches the network: Hugging Face offline mode is forced on.
"""

from __future__ import annotations

import os

# Forced before transformers/datasets are imported anywhere below: the CLI never downloads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402

from . import __version__  # noqa: E402
from .io import InputError  # noqa: E402

__all__ = ["app", "fit_workdir", "score_workdir", "write_report", "inspect_workdir", "CLI_FILE"]

CLI_FILE = "cli.json"
RESULTS_FILE = "results.jsonl"
SCORES_FILE = "scores.safetensors"
REPORT_FILE = "report.html"
CLI_SCHEMA = 1

Log = Callable[[str], None]


def _quiet_log(msg: str) -> None:
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------
# The pipeline, callable from Python (the demo uses it)
# ---------------------------------------------------------------------------------------


def _parse_modules(modules: str | list[str] | None) -> str | list[str] | None:
    """'mlp' -> 'mlp', 'all' -> None (every supported layer), 'a,b' -> ['a', 'b']."""
    if modules is None or isinstance(modules, list):
        return modules
    if modules == "all":
        return None
    if modules == "mlp":
        return "mlp"
    names = [m.strip() for m in modules.split(",") if m.strip()]
    if not names:
        raise InputError(f"--modules {modules!r} names no layer; pass 'mlp', 'all' or comma-separated names")
    return names


def _read_cli_json(workdir: Path) -> dict:
    from .storage import load_json

    if not workdir.exists():
        raise InputError(f"workdir {workdir} does not exist; run `headwater fit ... --workdir {workdir}` first")
    path = workdir / CLI_FILE
    if not path.exists():
        raise InputError(
            f"{workdir} is not a fitted headwater workdir (no {CLI_FILE}); run "
            f"`headwater fit --model PATH --data FILE --workdir {workdir}` first"
        )
    settings = load_json(path)
    if not isinstance(settings, dict) or "model" not in settings:
        raise InputError(f"{path} is damaged (no 'model' entry); refit into a new workdir")
    return settings


def _factors_meta(workdir: Path) -> dict | None:
    """The metadata header of factors.safetensors (without loading the tensors)."""
    path = workdir / "factors.safetensors"
    if not path.exists():
        return None
    from .storage import tensors_meta

    return tensors_meta(path, hint="refit")[0]


def attributor_from_settings(settings: dict, net: Any, task: Any, workdir: Path, progress: bool) -> Any:
    """The Attributor a workdir's cli.json describes (older files lack the newer keys)."""
    import headwater as hw

    return hw.Attributor(net, task=task, strategy=settings.get("strategy", "ekfac"),
                         modules=_parse_modules(settings.get("modules", "mlp")),
                         fisher=settings.get("fisher", "sampled"), samples=settings.get("samples", 1),
                         top=settings.get("top", 8), workdir=workdir, seed=settings.get("seed", 0),
                         progress=progress)  # fmt: skip


def fit_workdir(
    model: str | Path,
    data: str | Path,
    workdir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    modules: str | list[str] | None = "mlp",
    strategy: str = "ekfac",
    fisher: str = "auto",
    samples: int = 1,
    top: int = 8,
    max_length: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    log: Log = print,
) -> dict:
    """Fit curvature for a local HF model on a data file into ``workdir``; returns cli.json's content.

    Inputs are validated (data read, model loaded) before anything is written, so a bad
    argument leaves an existing workdir untouched.
    """
    import headwater as hw

    from .data import fingerprint
    from .io import context_length, file_sha256, load_model, load_tokenizer, read_documents, tokenizer_sha256
    from .storage import save_json

    workdir = Path(workdir)
    model_path = Path(model).resolve()
    tok_path = Path(tokenizer).resolve() if tokenizer is not None else model_path
    data_path = Path(data).resolve()
    docs = read_documents(data_path)
    net = load_model(model_path, device=device, dtype=dtype)
    tok = load_tokenizer(tok_path)
    ctx = context_length(net)
    if max_length is None:
        max_length = ctx
    elif max_length > ctx:
        raise InputError(f"--max-length {max_length} exceeds the model's context length {ctx}; pass at most {ctx}")
    mods = _parse_modules(modules)
    fp = fingerprint(docs)

    tok_hash = tokenizer_sha256(tok_path)
    # The engine checks first that the workdir belongs to this model (and strategy, modules);
    # then what only the CLI knows: truncation, tokenizer and data.
    task = hw.LanguageModelingTask(tokenizer=tok, max_length=max_length)
    prev_path = workdir / CLI_FILE
    meta = _factors_meta(workdir)
    if meta is not None and not overwrite:
        from .storage import load_json

        prev = load_json(prev_path) if prev_path.exists() else {}
        changed = [
            f"{k}={prev.get(k)!r} (now {v!r})"
            for k, v in (("max_length", max_length), ("tokenizer_sha256", tok_hash))
            if k in prev and prev[k] != v
        ]
        if changed:
            raise InputError(
                f"workdir {workdir} was fitted with {', '.join(changed)}; pass --overwrite to refit, "
                "or use a new workdir"
            )
        if meta.get("fit_data") not in (None, fp):
            raise InputError(
                f"workdir {workdir} already holds factors fitted on other data (fingerprint "
                f"{meta.get('fit_data')}, {data_path.name} has {fp}); pass --overwrite to refit, or use a new workdir"
            )
    an = hw.Attributor(net, task=task, strategy=strategy, modules=mods, fisher=fisher, samples=samples,
                       top=top, workdir=workdir, seed=seed, progress=progress)  # fmt: skip
    log(
        f"fitting {strategy} on {len(docs)} documents from {data_path.name}, {len(an.layers)} layers "
        f"({_short_layers(an.layers)}), max_length={max_length}"
    )
    t0 = time.perf_counter()
    an.fit(docs, batch_size=batch_size, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    settings = {
        "schema": CLI_SCHEMA,
        "headwater": __version__,
        "created": _now(),
        "model": str(model_path),
        "tokenizer": str(tok_path),
        "tokenizer_sha256": tok_hash,
        "data": str(data_path),
        "data_sha256": file_sha256(data_path),
        "data_fingerprint": fp,
        "n_train": len(docs),
        "max_length": max_length,
        "modules": modules if isinstance(modules, (str, type(None))) else list(modules),
        "layers": list(an.layers),
        "strategy": strategy,
        "fisher": an.fisher,
        "samples": samples,
        "top": top,
        "batch_size": batch_size,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "fit_seconds": round(seconds, 2),
    }
    save_json(prev_path, settings)
    log(f"fitted in {seconds:.1f}s -> {workdir / 'factors.safetensors'}")
    return settings


def _short_layers(layers: Any) -> str:
    names = list(layers)
    return ", ".join(names[:3]) + (f", ... {len(names) - 3} more" if len(names) > 3 else "")


def _token_pieces(tok: Any, ids: list[int]) -> list[str]:
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


def score_workdir(
    workdir: str | Path,
    queries: str | Path,
    *,
    data: str | Path | None = None,
    top_k: int = 20,
    query_rank: int | None = 32,
    damping: float | None = None,
    per_token: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Log = print,
    title: str | None = None,
    candidates: int | None = None,
) -> list[dict]:
    """Score queries against the training data; write scores, results.jsonl and report.html.

    Per-layer scores come from the main pass. Token heatmaps need per-token scores only for
    the sequences the report shows, so unless ``per_token`` asks for all of them, each
    query's top and bottom sequences are re-scored with ``per_token=True``: the same
    computation restricted to those columns, so exact and far cheaper than [Q, N, T].
    """
    import headwater as hw

    from .data import fingerprint
    from .io import document_text, load_model, load_tokenizer, read_documents, read_queries
    from .storage import atomic_write_text, save_tensors

    workdir = Path(workdir)
    settings = _read_cli_json(workdir)
    if settings.get("strategy") != "identity" and _factors_meta(workdir) is None:
        raise InputError(f"workdir {workdir} has no fitted factors (factors.safetensors); run `headwater fit` first")
    qs = read_queries(queries)
    if data is None:
        data = settings["data"]
        if not Path(data).exists():
            raise InputError(f"the training data {data} recorded at fit time no longer exists; pass --data FILE")
    data_path = Path(data).resolve()
    docs = read_documents(data_path)
    net = load_model(settings["model"], device=device or settings.get("device", "auto"),
                     dtype=settings.get("dtype", "float32"))  # fmt: skip
    tok = load_tokenizer(settings["tokenizer"])
    task = hw.LanguageModelingTask(tokenizer=tok, max_length=settings.get("max_length"))
    an = attributor_from_settings(settings, net, task, workdir, progress)
    bs = batch_size or settings.get("batch_size", 8)
    clean_q = [{"prompt": q["prompt"], "completion": q["completion"]} for q in qs]
    k = min(top_k, len(docs))
    rank = query_rank if query_rank else None

    log(f"scoring {len(qs)} queries against {len(docs)} training documents (query rank {rank or 'full'})")
    t0 = time.perf_counter()
    sc = an.scores(clean_q, docs, batch_size=bs, damping=damping, query_rank=rank, per_layer=True,
                   per_token=per_token, candidates=candidates)  # fmt: skip
    top, bottom = sc.top(k), sc.bottom(k)

    # per-token scores of the shown sequences: [Q][index] -> list over positions
    shown = [list(dict.fromkeys(top.indices[q].tolist() + bottom.indices[q].tolist())) for q in range(len(qs))]
    tokens_of: dict[int, list[int]] = {}
    for idx in {i for s in shown for i in s}:
        tokens_of[idx] = task.collate([docs[idx]])["input_ids"][0].tolist()
    token_scores: list[dict[int, list[float]]] = []
    if per_token:
        for q, idxs in enumerate(shown):
            token_scores.append({i: sc.per_token[q, i, : len(tokens_of[i])].tolist() for i in idxs})
    else:
        # An in-memory Attributor sharing the fitted curvature: these small re-scorings should
        # not each leave a cached result in the workdir the way a workdir-backed one would.
        sub = hw.Attributor(net, task=task, strategy=an.strategy, modules=list(an.layers), fisher=an.fisher,
                            samples=an.samples, top=an.top, seed=an.seed, progress=False)  # fmt: skip
        sub.curvature = an.curvature
        it: Any = range(len(qs))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="per-token scores", unit="query", leave=False, dynamic_ncols=True)
        for q in it:
            rows = [docs[i] for i in shown[q]]
            st = sub.scores([clean_q[q]], rows, batch_size=bs, damping=damping, query_rank=rank, per_token=True)
            token_scores.append({i: st.per_token[0, j, : len(tokens_of[i])].tolist() for j, i in enumerate(shown[q])})
    seconds = time.perf_counter() - t0

    pieces = {i: _token_pieces(tok, ids) for i, ids in tokens_of.items()}
    layers = list(an.layers)  # model order (a cached result's dict may be sorted by name)

    def entry(q: int, i: int, score: float) -> dict:
        raw = token_scores[q][i]
        # The value at position t comes from the gradient there, which carries the loss of
        # predicting token t+1; show it on that token. The last position predicts nothing
        # (its gradient is zero), so nothing is lost by the shift.
        shifted = [0.0] + raw[:-1]
        return {
            "index": i,
            "score": score,
            "text": document_text(docs[i], tok),
            "tokens": pieces[i],
            "token_scores": shifted,
            "per_layer": {n: float(sc.per_layer[n][q, i]) for n in layers},
        }

    results = []
    for q, query in enumerate(qs):
        res = {"query": q, **query}
        res["top"] = [entry(q, i, float(v)) for i, v in zip(top.indices[q].tolist(), top.values[q].tolist())]
        res["bottom"] = [entry(q, i, float(v)) for i, v in zip(bottom.indices[q].tolist(), bottom.values[q].tolist())]
        res["per_layer_top"] = {n: sum(e["per_layer"][n] for e in res["top"]) for n in layers}
        res["per_layer_bottom"] = {n: sum(e["per_layer"][n] for e in res["bottom"]) for n in layers}
        row = sc.values[q] if sc.mask is None else sc.values[q][sc.mask[q]]  # only scored candidates
        res["stats"] = {
            "n": int(row.numel()),
            "positive": int((row > 0).sum()),
            "mean": float(row.mean()),
            "std": float(row.std()) if row.numel() > 1 else 0.0,
            "max": float(row.max()),
            "min": float(row.min()),
        }
        if query.get("relevant") is not None:
            rel = set(query["relevant"])
            got = rel & set(top.indices[q].tolist())
            res["recall"] = len(got) / len(rel) if rel else None
            res["recall_k"] = k
        results.append(res)

    meta = {
        "schema": CLI_SCHEMA,
        "headwater": __version__,
        "created": _now(),
        "title": title or f"headwater report: {workdir.name}",
        "queries_file": str(Path(queries).resolve()),
        "data": str(data_path),
        "data_fingerprint": fingerprint(docs),
        "n_train": len(docs),
        "n_queries": len(qs),
        "top_k": k,
        "query_rank": rank,
        "damping": sc.meta.get("damping"),
        "damping_arg": damping,
        "per_token": per_token,
        "layers": layers,
        "strategy": settings.get("strategy"),
        "score_seconds": round(seconds, 2),
    }
    html = _render(results, sc, settings, meta)
    # every output is complete in memory before the first rename, so they change together
    save_tensors(workdir / SCORES_FILE, sc.tensors(), meta)
    atomic_write_text(workdir / RESULTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    atomic_write_text(workdir / REPORT_FILE, html)
    log(f"scored in {seconds:.1f}s -> {workdir / SCORES_FILE}, {workdir / RESULTS_FILE}, {workdir / REPORT_FILE}")
    return results


def _echo_top(results: list[dict]) -> None:
    """One terminal line per query: its most positive training sequence."""
    for r in results:
        best = r["top"][0]
        text = best["text"].replace("\n", " ")
        text = text if len(text) <= 80 else text[:77] + "..."
        typer.echo(f"{r['prompt']!r} -> {r['completion']!r}: top {best['score']:+.3g} #{best['index']} {text}")


def _render(results: list[dict], scores: Any, settings: dict, meta: dict) -> str:
    """The report, with the paper's analyses (``headwater.analysis``) of these scores in it."""
    from .analysis import analyze, layer_order
    from .report import render_report

    if scores.per_layer:  # analysis reads layers in model order
        names = meta.get("layers") or layer_order(list(scores.per_layer))
        scores.per_layer = {n: scores.per_layer[n] for n in names if n in scores.per_layer}
    analysis = analyze(scores)
    return render_report(results, scores.values, settings, meta, analysis)


def _read_results(path: Path) -> list[dict]:
    if not path.exists():
        raise InputError(f"{path} does not exist; run `headwater score --workdir {path.parent} ...` first")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}, line {n}: not valid JSON ({e.msg}); rerun `headwater score`") from e
    if not out:
        raise InputError(f"{path} holds no results; rerun `headwater score`")
    return out


def write_report(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Rebuild report.html from results.jsonl, scores.safetensors and cli.json (no model needed)."""
    from .storage import atomic_write_text, load_tensors

    workdir = Path(workdir)
    settings = _read_cli_json(workdir)
    results = _read_results(workdir / RESULTS_FILE)
    spath = workdir / SCORES_FILE
    if not spath.exists():
        raise InputError(f"{spath} does not exist; run `headwater score --workdir {workdir} ...` first")
    tensors, meta = load_tensors(spath)
    if "values" not in tensors or tensors["values"].shape[0] != len(results):
        raise InputError(
            f"{spath} does not match {workdir / RESULTS_FILE} (query counts differ); rerun `headwater score`"
        )
    target = Path(out) if out is not None else workdir / REPORT_FILE
    from .scoring import Scores

    atomic_write_text(target, _render(results, Scores.from_tensors(tensors, meta), settings, meta))
    return target


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def inspect_workdir(workdir: str | Path) -> dict:
    """What a workdir holds, from its files alone: settings, per-layer spectra, data, sizes."""
    import torch

    from .storage import load_json, load_tensors

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise InputError(f"workdir {workdir} does not exist; pass a directory made by `headwater fit`")
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        raise InputError(
            f"{workdir} is not a headwater workdir (no config.json); pass a directory made by `headwater fit`"
        )
    config = load_json(cfg_path)
    settings = load_json(workdir / CLI_FILE) if (workdir / CLI_FILE).exists() else {}
    info: dict[str, Any] = {
        "workdir": str(workdir.resolve()),
        "model": {
            "path": settings.get("model"),
            "class": (config.get("model") or {}).get("class"),
            "fingerprint": (config.get("model") or {}).get("fingerprint"),
        },
        "tokenizer": settings.get("tokenizer"),
        "strategy": config.get("strategy"),
        "fisher": config.get("fisher"),
        "samples": config.get("samples", 1),
        "top": config.get("top"),
        "seed": config.get("seed"),
        "max_length": settings.get("max_length"),
        "headwater": config.get("headwater"),
        "data": {
            "path": settings.get("data"),
            "sha256": settings.get("data_sha256"),
            "fingerprint": settings.get("data_fingerprint"),
            "n_train": settings.get("n_train"),
        },
        "layers": [],
        "fitted": config.get("strategy") == "identity",  # nothing to fit
        "files": {},
    }
    fpath = workdir / "factors.safetensors"
    modules = config.get("modules") or {}
    factors: dict[str, torch.Tensor] = {}
    if fpath.exists():
        factors, fmeta = load_tensors(fpath)
        info["fitted"] = True
        info["data"]["fit_fingerprint"] = fmeta.get("fit_data")
    for name, spec in modules.items():
        kind, out_f, in_f = spec
        layer: dict[str, Any] = {"name": name, "kind": kind, "shape": [out_f, in_f], "params": out_f * in_f}
        lam = factors.get(f"{name}::lam")
        if lam is None:
            lam = factors.get(f"{name}::diag")
        if lam is not None:
            lam = lam.double().flatten()
            mean = lam.mean().item()
            damp = 0.1 * mean
            sq = (lam * lam).sum().item()
            layer["eigenvalues"] = {
                "min": lam.min().item(),
                "median": lam.median().item(),
                "mean": mean,
                "max": lam.max().item(),
                "damping": damp,
                "below_damping": (lam < damp).double().mean().item(),
                # participation ratio: how many eigen-directions carry the curvature
                "effective_rank": (lam.sum().item() ** 2 / sq) if sq > 0 else 0.0,
                "condition": (lam.max() / (lam.min() + damp)).item() if damp > 0 else math.inf,
            }
        info["layers"].append(layer)
    spath = workdir / SCORES_FILE
    if spath.exists():
        from safetensors import safe_open

        from .storage import tensors_meta

        smeta = tensors_meta(spath)[0]
        with safe_open(str(spath), framework="pt") as f:
            shape = f.get_slice("values").get_shape() if "values" in f.keys() else None
        info["scores"] = {
            "shape": shape,
            "query_rank": smeta.get("query_rank"),
            "damping": smeta.get("damping"),
            "top_k": smeta.get("top_k"),
            "data_fingerprint": smeta.get("data_fingerprint"),
            "created": smeta.get("created"),
        }
    for p in sorted(workdir.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            info["files"][p.name] = p.stat().st_size
    return info


def _format_inspect(info: dict) -> str:
    lines = [f"workdir   {info['workdir']}"]
    m = info["model"]
    lines.append(f"model     {m.get('path') or '?'}  ({m.get('class')}, fingerprint {m.get('fingerprint')})")
    if info.get("tokenizer") and info["tokenizer"] != m.get("path"):
        lines.append(f"tokenizer {info['tokenizer']}")
    lines.append(
        f"strategy  {info['strategy']}  fisher={info['fisher']}"
        + (f" (top {info['top']})" if info.get("top") else "")
        + (f"  samples={info['samples']}" if info.get("samples", 1) != 1 else "")
        + f"  seed={info['seed']}  "
        f"max_length={info.get('max_length')}  headwater {info.get('headwater')}"
    )
    d = info["data"]
    lines.append(
        f"data      {d.get('path') or '?'}  ({d.get('n_train')} documents, sha256 {d.get('sha256')}, "
        f"fingerprint {d.get('fingerprint')})"
    )
    lines.append(f"fitted    {'yes' if info['fitted'] else 'no (run headwater fit)'}")
    lines.append(f"layers    {len(info['layers'])}")
    cols = ("min", "median", "mean", "max", "damping")
    header = f"  {'layer':<34} {'O x I':>11} " + " ".join(f"{c:>9}" for c in cols)
    lines.append(header + f" {'<damp':>6} {'eff.rank':>8}")
    for layer in info["layers"]:
        shape = f"{layer['shape'][0]}x{layer['shape'][1]}"
        ev = layer.get("eigenvalues")
        if ev is None:
            lines.append(f"  {layer['name']:<34} {shape:>11}   (not fitted)")
            continue
        lines.append(
            f"  {layer['name']:<34} {shape:>11} {ev['min']:>9.2e} {ev['median']:>9.2e} {ev['mean']:>9.2e} "
            f"{ev['max']:>9.2e} {ev['damping']:>9.2e} {ev['below_damping']:>6.0%} {ev['effective_rank']:>8.1f}"
        )
    if "scores" in info:
        s = info["scores"]
        lines.append(
            f"scores    {s['shape'][0]} queries x {s['shape'][1]} documents, query rank {s['query_rank'] or 'full'}, "
            f"top-k {s['top_k']}, {s.get('created')}"
        )
    lines.append("files")
    for name, size in info["files"].items():
        lines.append(f"  {name:<28} {_human_bytes(size):>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Typer commands
# ---------------------------------------------------------------------------------------

app = typer.Typer(
    name="headwater",
    help="Which training examples made the model behave like this? EK-FAC influence functions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_STATE = {"quiet": False, "debug": False}

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


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
    _STATE["quiet"], _STATE["debug"] = quiet, debug


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    known = (InputError, ValueError, TypeError, FileNotFoundError, PermissionError, ArithmeticError)
    import headwater as hw

    if isinstance(e, known + (hw.NotFittedError,)):
        return text
    return f"{type(e).__name__}: {text} (rerun with --debug for the traceback)"


def _setup(quiet: bool, debug: bool) -> tuple[bool, bool, Log]:
    """Merge the per-command flags with the global ones; pick where status lines go (stderr)."""
    quiet = quiet or _STATE["quiet"]
    debug = debug or _STATE["debug"]
    log: Log = _quiet_log if quiet else (lambda msg: typer.echo(msg, err=True))
    return quiet, debug, log


@contextlib.contextmanager
def _library_noise(quiet: bool, debug: bool) -> Iterator[None]:
    """Silence library warnings (and with --quiet, HF's own progress bars) for one command.

    Restored afterwards, because tests and notebooks run commands in-process.
    """
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # pragma: no cover - a missing transformers is reported by the command
        hf_logging = None
    with warnings.catch_warnings():
        if debug or hf_logging is None:
            yield
            return
        warnings.simplefilter("ignore")
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def _run(quiet: bool, debug: bool, fn: Callable[[], Any]) -> Any:
    """Run a command body: one-line errors with exit status 2, tracebacks only with --debug."""
    try:
        with _library_noise(quiet, debug):
            return fn()
    except KeyboardInterrupt:
        typer.echo("headwater: interrupted; no partial files were written", err=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:
        if debug:
            raise
        typer.echo(f"headwater: error: {_one_line(e)}", err=True)
        raise typer.Exit(2) from None


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
    quiet, debug, _ = _setup(quiet, debug)
    from .demo import demo_is_small, run_demo

    _run(quiet, debug, lambda: run_demo(out, small=small or demo_is_small(), quiet=quiet, seed=seed))


@app.command()
def fit(
    model: Annotated[Path, typer.Option("--model", "-m", help="Local Hugging Face model directory.")],
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Training data: JSONL with 'text', plain text, parquet or arrow.")
    ],
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Where the factors and settings are saved.")],
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory, if not saved with the model.")] = None,
    modules: Annotated[
        str, typer.Option(help="'mlp' (MLP projections), 'all' (every linear layer) or comma-separated names.")
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
    seed: Annotated[int, typer.Option(help="Seed for the sampled Fisher's pseudo-labels.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (as saved).")] = "float32",
    overwrite: Annotated[
        bool, typer.Option(help="Refit even if the workdir holds factors for other data or settings.")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fit the curvature (covariances, eigendecomposition, eigenvalue correction) into a workdir."""
    quiet, debug, log = _setup(quiet, debug)
    _run(
        quiet,
        debug,
        lambda: fit_workdir(
            model, data, workdir, tokenizer=tokenizer, modules=modules, strategy=strategy, fisher=fisher,
            samples=samples, top=top, max_length=max_length, batch_size=batch_size, seed=seed, device=device,
            dtype=dtype, overwrite=overwrite, progress=not quiet, log=log,
        ),
    )  # fmt: skip


@app.command()
def score(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="A workdir made by `headwater fit`.")],
    queries: Annotated[Path, typer.Option("--queries", help="JSONL with 'prompt' and 'completion' per line.")],
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Training data to score (default: the data fitted on).")
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, help="Most positive and most negative sequences to keep.")
    ] = 20,
    query_rank: Annotated[
        int, typer.Option("--query-rank", min=0, help="Low-rank query gradients (the paper uses 32); 0 = exact.")
    ] = 32,
    damping: Annotated[
        float | None, typer.Option(min=0.0, help="Absolute damping (default: 0.1 x mean eigenvalue per layer).")
    ] = None,
    per_token: Annotated[
        bool, typer.Option("--per-token", help="Save per-token scores for every training sequence ([Q, N, T]).")
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Sequences per batch (default: as fitted).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, ... (default: as fitted).")] = None,
    candidates: Annotated[
        int | None,
        typer.Option("--candidates", min=1, help="Score only each query's top-N BM25 candidates (paper: 10,000)."),
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score queries against the training data; write scores.safetensors, results.jsonl, report.html."""
    quiet, debug, log = _setup(quiet, debug)

    def body() -> None:
        results = score_workdir(
            workdir, queries, data=data, top_k=top_k, query_rank=query_rank or None, damping=damping,
            per_token=per_token, batch_size=batch_size, device=device, progress=not quiet, log=log,
            candidates=candidates,
        )  # fmt: skip
        _echo_top(results)

    _run(quiet, debug, body)


@app.command()
def report(
    workdir: Annotated[Path, typer.Argument(help="A workdir where `headwater score` has run.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write (default: WORKDIR/report.html).")
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rebuild report.html from the saved results (no model needed)."""
    quiet, debug, log = _setup(quiet, debug)
    target = _run(quiet, debug, lambda: write_report(workdir, out))
    log(f"wrote {target}")


@app.command()
def inspect(
    workdir: Annotated[Path, typer.Argument(help="A workdir made by `headwater fit`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Summarize a workdir: model, layers, strategy, damping, eigenvalue spectra, data, sizes."""
    quiet, debug, _ = _setup(True, debug)
    info = _run(quiet, debug, lambda: inspect_workdir(workdir))
    typer.echo(json.dumps(info, indent=2) if as_json else _format_inspect(info))


# Command groups that live beside their modules (imported last: they reuse this module's helpers).
from .analysis import analyze_command  # noqa: E402
from .evaluate.cli import app as evaluate_app  # noqa: E402
from .index_cli import index_app  # noqa: E402

app.command("analyze")(analyze_command)
app.add_typer(evaluate_app, name="evaluate", help="Measure attribution quality: LDS, PBRF, planted-fact retrieval.")
app.add_typer(index_app, name="index", help="Build a projected-gradient index once; answer queries from it.")


def main() -> None:  # pragma: no cover - `python -m headwater.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
